"""Acceptance parity with llama.cpp: the same DSpark drafter and the same target, in F32, in both engines.

One script does it all, resumably:

1. builds llama.cpp once into a cache folder, from the ``llama-cpp-python`` sdist on PyPI (which
   vendors it): ``llama-speculative-simple`` and ``llama-completion``;
2. converts, with llama.cpp's own ``convert_hf_to_gguf.py``, the target from dspark's
   de-quantized weights (so both engines run the same numbers) and the drafter through
   ``dspark convert export --engine llama.cpp`` (whose GGUF step is that same converter);
3. runs the first ``--limit`` prompts of each dev set (first turns) at T = 0, 128 tokens, one
   thread, interleaved per prompt: llama.cpp plain, ``draft-dspark`` and ``ngram-simple``
   (``--spec-draft-n-max γ``: whole blocks), dspark plain, dspark's whole-block loop (the same
   rounds as llama.cpp's) and dspark's product path (``--policy auto``);
4. writes JSON (per prompt and per set: accepted / drafted, τ, greedy equality of the two
   targets' plain outputs, decode tok/s of every run) and prints a table.

Decode tok/s excludes the prompt on both sides: llama.cpp's own ``decoded N tokens in T s`` /
``eval time``, dspark's new tokens over wall minus prefill. Greedy equality compares token ids
(llama.cpp's text re-encoded by the target's tokenizer) over the tokens both produced.

    .venv/bin/python benchmarks/speed/llamacpp_parity.py --limit 10 --out benchmarks/results/llamacpp_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-speculative-simple", "llama-completion")
SETS = ("gsm8k", "humaneval", "mbpp", "mt-bench")
RUNS = ("llama.cpp plain", "llama.cpp draft-dspark", "llama.cpp ngram-simple", "dspark plain", "dspark whole blocks",
        "dspark product path")


# -- llama.cpp: build, convert, run ------------------------------------------------------------
def build_llama_cpp(cache: Path) -> Path:
    """llama.cpp's source folder with the two binaries built (once; about 7 minutes on 2 cores)."""
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if all((src / "build" / "bin" / t).is_file() for t in TARGETS):
        return src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)])
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    print(f"building llama.cpp in {src} (about 7 minutes) ...", file=sys.stderr, flush=True)
    _run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"], cwd=src)
    _run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", *TARGETS], cwd=src)
    return src


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: {shlex.join(command)} failed (exit {run.returncode}):\n{tail}")
    return run


def convert(llama: Path, cache: Path, drafter: str) -> tuple[Path, Path]:
    """(target GGUF, drafter GGUF), both F32, made once per drafter folder."""
    from dspark.drafters.dspark.interop.llamacpp import target_folder

    target_gguf = cache / "smollm2-135m-instruct-f32.gguf"
    if not target_gguf.is_file():
        _run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(target_folder(None)), "--outtype", "f32",
              "--outfile", str(target_gguf)])
    folder = cache / ("draft-" + re.sub(r"[^A-Za-z0-9]+", "-", str(Path(drafter).resolve())).strip("-")[-60:])
    draft_gguf = folder / "draft-f32.gguf"
    if not draft_gguf.is_file():
        _run([str(Path(sys.executable).parent / "dspark"), "convert", "export", drafter, str(folder), "--engine",
              "llama.cpp", "--dtype", "float32", "--llama-cpp-converter", str(llama / "convert_hf_to_gguf.py")])
    return target_gguf, draft_gguf


def llama_run(llama: Path, target_gguf: Path, prompt: str, tokens: int, threads: int, spec: list[str]) -> dict:
    """One llama.cpp generation: its text and its own counters."""
    binary = "llama-speculative-simple" if spec else "llama-completion"
    command = [str(llama / "build" / "bin" / binary), "-m", str(target_gguf), "-p", prompt, "-n", str(tokens),
               "--temp", "0", "-t", str(threads), "-c", "2048", "--seed", "0", *spec]
    if not spec:
        command += ["-no-cnv", "--no-display-prompt"]
    run = _run(command)
    text = run.stdout
    if spec:  # speculative-simple echoes the prompt after two newlines
        text = text.removeprefix("\n\n").removeprefix(prompt)
    text = text.rstrip().removesuffix("[end of text]").rstrip()  # the binaries end with newlines; compared without them
    log = run.stderr
    if spec:
        decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        count, seconds = int(decoded.group(1)), float(decoded.group(2))
        drafted = int(re.search(r"n_drafted\s*=\s*(\d+)", log).group(1))
        accepted = int(re.search(r"n_accept\s*=\s*(\d+)", log).group(1))
    else:
        timing = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
        seconds, count = float(timing.group(1)) / 1000, int(timing.group(2))
        drafted = accepted = 0
    prompt_tokens = re.search(r"encoded\s+(\d+) tokens", log) if spec else re.search(r"prompt eval time =.*?/\s*(\d+) tokens", log)
    return {"text": text, "decode_tokens": count, "decode_s": seconds, "drafted": drafted, "accepted": accepted,
            "prompt_tokens": int(prompt_tokens.group(1)) if prompt_tokens else None}


# -- dspark ----------------------------------------------------------------------------------------
def dspark_run(engine, prompt_ids: list[int], tokens: int) -> dict:
    from dspark.engine import GenerationRequest
    from dspark.sampling import SamplingParams

    result = engine.generate(GenerationRequest(prompt_ids, SamplingParams(temperature=0.0), max_new_tokens=tokens))
    s = result.stats
    return {"token_ids": list(result.token_ids), "decode_tokens": s.new_tokens, "decode_s": s.wall_s - s.prefill_s,
            "drafted": sum(s.proposed), "accepted": sum(s.accepted), "rounds": s.rounds}


def shown_path(path: str) -> str:
    """``path`` as results record it: relative to the repository or the package, never this machine's."""
    resolved = Path(path).resolve()
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if resolved.is_relative_to(root):
            return str(resolved.relative_to(root))
    return Path(path).name


def same_prefix(a: str, b: str) -> dict:
    """Texts equal over the characters both have (llama.cpp runs a few tokens past the budget)?
    Text, not re-encoded ids: a generated " Jan" + "et" re-encodes as " Janet"."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    return {"compared_chars": n, "identical": first is None, "first_difference": first}


def token_at(target, ids: list[int], char: int) -> int:
    """Index of the token of ``ids`` whose text holds character ``char`` of their decoded text."""
    return next(i for i in range(1, len(ids) + 1) if len(target.decode(ids[:i])) > char) - 1


def top2_gap(target, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit after ``ids`` (dspark's forward): how near a tie a divergence sits."""
    import torch

    with torch.inference_mode():
        logits = target.forward(torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


# -- aggregation -----------------------------------------------------------------------------------
def summarise(records: list[dict]) -> dict:
    out = {}
    for run in RUNS:
        rows = [r[run] for r in records]
        drafted, accepted = sum(x["drafted"] for x in rows), sum(x["accepted"] for x in rows)
        tokens, seconds = sum(x["decode_tokens"] for x in rows), sum(x["decode_s"] for x in rows)
        out[run] = {"drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None,
                    "tokens_per_s": tokens / seconds if seconds else None}
    for run in ("llama.cpp draft-dspark", "dspark whole blocks"):
        rows = [r[run] for r in records]
        rounds = sum(x["rounds"] for x in rows)
        out[run]["tau"] = (rounds + out[run]["accepted"]) / rounds if rounds else None
    ours, theirs = out["dspark whole blocks"]["acceptance"], out["llama.cpp draft-dspark"]["acceptance"]
    out["acceptance_relative_difference"] = (theirs - ours) / ours if ours else None
    # Where the texts differ, the two engines drafted for different contexts: a near-tie that
    # rounded the other way in one target, or in llama.cpp's k-token verification against its own
    # 1-token plain steps. The like-for-like comparison is over prompts whose texts all agree.
    same = [r for r in records if r["greedy"]["identical"] and r["llama.cpp lossless"]["identical"]]
    ours_same = sum(r["dspark whole blocks"]["accepted"] for r in same) / max(1, sum(r["dspark whole blocks"]["drafted"] for r in same))
    theirs_same = sum(r["llama.cpp draft-dspark"]["accepted"] for r in same) / max(1, sum(r["llama.cpp draft-dspark"]["drafted"] for r in same))
    out["same_text_prompts"] = len(same)
    out["acceptance_relative_difference_same_text"] = (theirs_same - ours_same) / ours_same if ours_same else None
    out["greedy_identical"] = sum(r["greedy"]["identical"] for r in records)
    out["llama_cpp_draft_identical_to_its_plain"] = sum(r["llama.cpp lossless"]["identical"] for r in records)
    out["prompts"] = len(records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default=None, help="dspark drafter folder (default: the shipped SmolLM2 drafter)")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dspark" / "llama.cpp")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llamacpp_parity.json"))
    parser.add_argument("--render", type=Path, default=None,
                        help="only render this results JSON: its tables as markdown, and its plot beside it")
    parser.add_argument("--resummarise", action="store_true",
                        help="with --render: recompute its per-set summaries from its records and write them back")
    args = parser.parse_args()
    if args.render is not None:
        result = json.loads(args.render.read_text())
        if args.resummarise:
            sets = list(dict.fromkeys(r["set"] for r in result["records"]))
            result["per_set"] = {name: summarise([r for r in result["records"] if r["set"] == name]) for name in sets}
            result["overall"] = summarise(result["records"])
            result["resummarised_by"] = shlex.join([".venv/bin/python", "benchmarks/speed/llamacpp_parity.py", *sys.argv[1:]])
            args.render.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.render.with_suffix(".png"))
        print(markdown(result))
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from tqdm import tqdm

    from dspark.drafters.factory import SHIPPED_DRAFTER
    from dspark.engine.build import build_single_engine, load_drafter
    from dspark.drafters.base import NoDrafter
    from dspark.evaluation.datasets import load_dataset
    from dspark.evaluation.provenance import git_state, machine_info
    from dspark.target import TargetModel

    torch.set_num_threads(args.threads)
    drafter = str(args.drafter or SHIPPED_DRAFTER)
    llama = build_llama_cpp(args.cache)
    target_gguf, draft_gguf = convert(llama, args.cache, drafter)
    target = TargetModel.load(None)
    target.warm_up()
    gamma = load_drafter(f"dspark:{drafter}", target).gamma
    engines = {
        "dspark plain": build_single_engine(target, NoDrafter()),
        "dspark whole blocks": build_single_engine(target, f"dspark:{drafter}"),
        "dspark product path": build_single_engine(target, f"dspark:{drafter}", policy="auto", profile_if_missing=True),
    }
    spec = {"llama.cpp draft-dspark": ["-md", str(draft_gguf), "--spec-type", "draft-dspark", "--spec-draft-n-max", str(gamma),
                                       "-td", str(args.threads)],
            "llama.cpp ngram-simple": ["--spec-type", "ngram-simple", "--spec-draft-n-max", str(gamma)]}
    journal = args.out.with_suffix(".journal.jsonl")
    done = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            row = json.loads(line)
            done[(row["set"], row["index"])] = row
    prompts = [(ds.name, c.index, c.turns[0]) for name in args.sets
               for ds in [load_dataset(name, limit=args.limit)] for c in ds.conversations]
    for name, index, turn in tqdm(prompts, desc="prompts", unit="prompt"):
        if (name, index) in done:
            continue
        ids = target.encode_prompt(turn)
        text = target.tokenizer.decode(ids, skip_special_tokens=False)
        row = {"set": name, "index": index, "prompt_tokens": len(ids)}
        row["llama.cpp plain"] = llama_run(llama, target_gguf, text, args.max_new_tokens, args.threads, [])
        for run, extra in spec.items():
            row[run] = llama_run(llama, target_gguf, text, args.max_new_tokens, args.threads, extra)
            row[run]["rounds"] = -(-row[run]["drafted"] // gamma)  # llama.cpp drafts γ a round (fewer at the budget's end)
        for run, engine in engines.items():
            row[run] = dspark_run(engine, ids, args.max_new_tokens)
        plain_ids = row["dspark plain"]["token_ids"]
        row["greedy"] = same_prefix(row["llama.cpp plain"]["text"], target.decode(plain_ids).rstrip())
        if not row["greedy"]["identical"]:
            at = token_at(target, plain_ids, row["greedy"]["first_difference"])
            row["greedy"].update(token=at, top2_logit_gap=top2_gap(target, ids + plain_ids[:at]))
        row["llama.cpp lossless"] = same_prefix(row["llama.cpp draft-dspark"]["text"], row["llama.cpp plain"]["text"])
        with journal.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[(name, index)] = row
    records = [done[(n, i)] for n, i, _ in prompts]
    per_set = {name: summarise([r for r in records if r["set"] == name]) for name in args.sets}
    result = {
        "command": shlex.join([".venv/bin/python", "benchmarks/speed/llamacpp_parity.py", *sys.argv[1:]]),
        "what": "the same drafter and target (F32) in llama.cpp and dspark at T = 0, whole blocks of γ in both",
        "drafter": shown_path(drafter), "gamma": gamma, "llama_cpp": f"vendored by llama-cpp-python {LLAMA_CPP_PYTHON}",
        "machine": machine_info(target), "git": git_state(), "date": time.strftime("%Y-%m-%d"),
        "per_set": per_set, "overall": summarise(records), "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print_table(result)


def table_rows(result: dict):
    """(acceptance rows, speed rows) of the two tables, per set and overall."""
    rows = {**result["per_set"], "overall": result["overall"]}
    accept, speed = [], []
    for name, s in rows.items():
        ours, theirs = s["dspark whole blocks"], s["llama.cpp draft-dspark"]
        accept.append([
            name, f"{ours['accepted']}/{ours['drafted']} ({ours['acceptance']:.3f})",
            f"{theirs['accepted']}/{theirs['drafted']} ({theirs['acceptance']:.3f})",
            f"{s['acceptance_relative_difference']:+.1%}",
            (f"{s['acceptance_relative_difference_same_text']:+.1%} ({s['same_text_prompts']})"
             if s.get("acceptance_relative_difference_same_text") is not None else "–"),
            f"{ours['tau']:.3f}", f"{theirs['tau']:.3f}",
            f"{s['greedy_identical']}/{s['prompts']}", f"{s['llama_cpp_draft_identical_to_its_plain']}/{s['prompts']}",
        ])
        speed.append([name, *[f"{s[run]['tokens_per_s']:.1f}" for run in RUNS]])
    return accept, speed


ACCEPT_COLUMNS = ("set", "dspark accepted/drafted", "llama.cpp accepted/drafted", "rel. diff",
                  "rel. diff, same texts (prompts)", "τ dspark", "τ llama.cpp",
                  "greedy = (targets)", "llama.cpp spec = its plain")


def markdown(result: dict) -> str:
    accept, speed = table_rows(result)
    lines = []
    for header, rows in ((ACCEPT_COLUMNS, accept), (("set", *RUNS), speed)):
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Decode tok/s of every run per set (bars), and accepted per drafted token in both engines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [*result["per_set"], "overall"]
    rows = {**result["per_set"], "overall": result["overall"]}
    fig, (speed, accept) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(RUNS)
    for i, run in enumerate(RUNS):
        speed.bar([j + i * width for j in range(len(sets))], [rows[s][run]["tokens_per_s"] for s in sets], width, label=run)
    speed.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
    speed.set_ylabel("decode tok/s (one thread)")
    speed.legend(fontsize=7)
    for i, run in enumerate(("dspark whole blocks", "llama.cpp draft-dspark")):
        accept.bar([j + i * 0.4 for j in range(len(sets))], [rows[s][run]["acceptance"] for s in sets], 0.4,
                   label=run.replace(" whole blocks", "").replace(" draft-dspark", ""))
    accept.set_xticks([j + 0.2 for j in range(len(sets))], sets, rotation=30)
    accept.set_ylabel("accepted / drafted")
    accept.legend(fontsize=7)
    fig.suptitle(f"{result['drafter']} in llama.cpp and dspark: T = 0, γ = {result['gamma']}, whole blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    accept_rows, speed_rows = table_rows(result)
    title = f"{result['drafter']}: T = 0, γ = {result['gamma']}, whole blocks in both engines"
    accept = Table(title=f"Acceptance, {title}")
    for column in ACCEPT_COLUMNS:
        accept.add_column(column, justify="right")
    for row in accept_rows:
        accept.add_row(*row)
    speed = Table(title="Decode tok/s (prompt excluded), one thread")
    for column in ("set", *RUNS):
        speed.add_column(column, justify="right")
    for row in speed_rows:
        speed.add_row(*row)
    Console(width=160).print(accept, speed)


if __name__ == "__main__":
    main()
