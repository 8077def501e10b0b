"""The GPU smoke check: one call of the device tool (at most 10 minutes), JSON under --out.

    bash scripts/gpu_check.sh --prepare                      # here: tokenizer files into .gpu_check/
    bash scripts/gpu_check.sh --device cuda --out "$OUT"     # there (carry .gpu_check)
    bash scripts/gpu_check.sh --device cpu --tiny --out /tmp/gpu_check   # the same steps here, tiny

The real weights cannot travel: the device tool carries at most 64 MiB of working tree, and
the default target's GGUF alone is 98 MB. So the targets are random-init with the real
shapes of SmolLM2-135M-Instruct and Gemma 3 270M (its vocabulary cut to SmolLM2's tokenizer,
whose files travel in .gpu_check/), and the drafter is a random DSpark drafter made for the
first. The check proves the code correct on the device and measures its costs; acceptance
rates mean nothing here. In order:

1. ``generate --compare`` in bfloat16 and float32, at T = 0 and T = 1 (greedy near-ties are
   reported, not hidden: see the README's note on greedy equality on GPUs);
2. ``profile`` at two contexts;
3. 16 prompts through the batched engine at max batch 8, host syncs counted per step
   (``torch.cuda.set_sync_debug_mode("warn")`` on CUDA, and everywhere a torch function
   mode that counts the calls that wait for the device: ``item``, ``tolist``, ``bool``...);
4. the Gemma-shaped target in float16, T = 1, 256 tokens;
5. ``data regen`` of a few prompts, 10 training steps, then a resume to 20;
6. a ``torch.profiler`` summary of 20 batched steps.

A step that fails is recorded with its error and the next one runs; the exit status is
non-zero when any failed. Output: ``gpu_check.json`` (every step), ``profiler.txt``, ``log.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".gpu_check"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROMPT = "Write a Python function that checks whether a number is prime."
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal", "allclose"}
"""Tensor functions that wait for the device: the host needs their value."""
TO_HOST = {"cpu", "to", "numpy"}
"""...and copies to the host, counted when the tensor is not on the CPU already."""


def smollm2_config(tiny: bool) -> dict:
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32) if tiny else dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=100000.0, tie_word_embeddings=True, **shape)


def gemma3_config(tiny: bool) -> dict:
    layers = 6 if tiny else 18
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 query_pre_attn_scalar=32) if tiny else dict(
        hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=256)
    return dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=49152, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, max_position_embeddings=32768, sliding_window=512,
                num_hidden_layers=layers, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
                **shape)


def prepare(assets: Path) -> None:
    """Copy the default target's tokenizer files (from its de-quantized cache) into ``assets``."""
    from dspark.target.loading import resolve

    folder = Path(resolve(None)[0])
    assets.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(folder / name, assets / name)
    print(f"wrote {', '.join(TOKENIZER_FILES)} to {assets} ({sum((assets / n).stat().st_size for n in TOKENIZER_FILES) / 1e6:.1f} MB)")


def random_target(config: dict, folder: Path, assets: Path, seed: int = 0) -> Path:
    """A random-init causal LM of ``config``'s shape, saved (float32) with the carried tokenizer.
    The tied embedding is scaled so the logits spread about like a real model's (std ~3):
    greedy decoding is then neither a sea of near-ties nor one token repeated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(std=3.0 / config["hidden_size"] ** 0.5)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy2(assets / name, folder / name)
    return folder


def random_drafter(target_folder: Path, folder: Path) -> Path:
    import torch

    from dspark.drafters.dspark import DSparkConfig, DSparkModel
    from dspark.target import TargetModel

    target = TargetModel.load(str(target_folder))
    torch.manual_seed(1)
    model = DSparkModel(DSparkConfig.for_target(target))
    with torch.no_grad():
        model.confidence_head.proj.weight.normal_(std=0.5)
    model.save_pretrained(folder)
    return folder


class HostSyncs:
    """Counts, per function name, the torch calls that make the host wait for the device."""

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        counts: dict[str, int] = {}
        self.counts = counts

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in SYNCING or (name in TO_HOST and args and getattr(args[0], "device", None) is not None
                                       and args[0].device.type != "cpu" and _to_host(name, args, kwargs)):
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self) -> "HostSyncs":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _to_host(name: str, args, kwargs) -> bool:
    if name != "to":
        return True
    where = [a for a in (*args[1:], *(kwargs or {}).values()) if isinstance(a, str) or type(a).__name__ == "device"]
    return any(str(w).startswith("cpu") for w in where)


class Check:
    def __init__(self, args) -> None:
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work) if args.work else self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = (self.out / "log.txt").open("w", encoding="utf-8")
        self.env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "DSPARK_PROFILE_DIR": str(self.work / "profiles"), "PYTHONUNBUFFERED": "1"}
        self.steps: list[dict] = []

    def dspark(self, *argv: str, timeout: float = 300) -> dict | None:
        """Run ``dspark argv`` (its JSON output parsed when it prints one)."""
        cmd = [sys.executable, "-m", "dspark", *argv]
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        self.log.write(done.stdout[-4000:] + done.stderr[-4000:] + "\n")
        if done.returncode:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None

    def step(self, name: str, fn) -> None:
        start = time.perf_counter()
        record: dict = {"step": name}
        try:
            record.update(fn() or {})
            record["ok"] = True
        except Exception as exc:  # a failed step is recorded and the next one runs
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            self.log.write(traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.steps.append(record)
        print(f"{'ok  ' if record['ok'] else 'FAIL'} {name:<22} {record['seconds']:>7.1f} s  "
              f"{record.get('summary', record.get('error', ''))}", flush=True)
        self.save()

    def save(self) -> None:
        import torch

        device = self.args.device
        info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "cpu",
                "tiny": self.args.tiny}
        result = {"check": "gpu_check", "command": " ".join(["bash scripts/gpu_check.sh", *sys.argv[1:]]),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": info, "steps": self.steps,
                  "ok": all(s["ok"] for s in self.steps)}
        (self.out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "build/gpu_check"))
    parser.add_argument("--work", default=None, help="Where targets, data and runs go (default: OUT/work).")
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes and lengths (a CPU test of the script).")
    parser.add_argument("--prepare", action="store_true", help="Only copy the tokenizer files into .gpu_check/.")
    parser.add_argument("--assets", default=str(ASSETS))
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.assets))
        return 0
    assets = Path(args.assets)
    if not all((assets / n).is_file() for n in TOKENIZER_FILES):
        print(f"gpu_check: {assets} lacks the tokenizer files; run `bash scripts/gpu_check.sh --prepare` first", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "src"))
    check = Check(args)
    tiny, device = args.tiny, args.device
    new_tokens = 16 if tiny else 128
    work = check.work
    smol = gemma = drafter = None

    def build():
        nonlocal smol, gemma, drafter
        smol = random_target(smollm2_config(tiny), work / "smollm2-shaped", assets)
        gemma = random_target(gemma3_config(tiny), work / "gemma3-shaped", assets, seed=1)
        drafter = random_drafter(smol, work / "dspark-random")
        return {"summary": "random-init SmolLM2- and Gemma-3-shaped targets, a random DSpark drafter"}

    check.step("build", build)
    spec = f"dspark:{drafter}+ngram"

    def compare():
        rows = {}
        for dtype in ("bfloat16", "float32"):
            for t in (0, 1):
                r = check.dspark("generate", PROMPT, "--model", str(smol), "--drafter", spec, "--device", device,
                                 "--dtype", dtype, "--temperature", str(t), "--max-new-tokens", str(new_tokens),
                                 "--compare", "--json")
                rows[f"{dtype}_t{t}"] = {k: r.get(k) for k in (
                    "speedup", "identical_to_plain", "tau", "first_difference", "top2_logit_gap", "tokens_per_second",
                    "plain_tokens_per_second") if k in r}
        greedy = {k: v["identical_to_plain"] or f"differs at {v['first_difference']} (top-2 gap {v['top2_logit_gap']:.2g})"
                  for k, v in rows.items() if k.endswith("t0")}
        return {"runs": rows, "summary": f"greedy identical to plain: {greedy}"}

    check.step("generate --compare", compare)

    def profile():
        extra = ["--max-requests", "2", "--max-draft", "3", "--repeats", "1", "--context", "16", "--context", "32"] if tiny \
            else ["--max-requests", "16", "--max-draft", "7", "--repeats", "3", "--context", "256", "--context", "1024"]
        r = check.dspark("profile", "--model", str(smol), "--device", device, "--dtype", "bfloat16", "--json", *extra)
        ms = [[round(1000 / v, 3) for v in row] for row in r["steps_per_s"]]
        return {"table": r, "summary": f"R=1 W=1: {ms[0][0]} ms, R=1 W=8: {ms[0][-1]} ms at context {r['context']}"}

    check.step("profile", profile)

    def batch_syncs():
        import torch

        from dspark.engine.build import build_engine
        from dspark.engine.request import GenerationRequest
        from dspark.sampling import SamplingParams
        from dspark.target import TargetModel

        target = TargetModel.load(str(smol), device=device)
        engine = build_engine(target, spec, "fixed:4", max_batch=8)
        prompts = [f"Question {i}: what is {i} times {i + 3}? Explain step by step." for i in range(16)]
        requests = [GenerationRequest(target.encode_prompt(p), SamplingParams(temperature=float(i % 2)),
                                      max_new_tokens=new_tokens, seed=i) for i, p in enumerate(prompts)]
        engine.generate(requests[:2])  # warm-up
        cuda = torch.device(device).type == "cuda"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with HostSyncs() as syncs:
                    result = engine.generate(requests)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        steps = len(result.stats.steps)
        debug = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
        per_step = syncs.total / steps
        return {"requests": 16, "max_batch": 8, "steps": steps, "host_syncs": syncs.total, "host_syncs_by_call": syncs.counts,
                "host_syncs_per_step": round(per_step, 2), "cuda_sync_debug_warnings": debug,
                "tokens_per_second": round(result.stats.tokens_per_second, 1),
                "summary": f"{syncs.total} host syncs over {steps} steps ({per_step:.1f} per step; "
                           f"cuda sync-debug warnings: {debug})"}

    check.step("batch host syncs", batch_syncs)

    def gemma_half():
        r = check.dspark("generate", PROMPT, "--model", str(gemma), "--drafter", "ngram", "--device", device,
                         "--dtype", "float16", "--temperature", "1", "--max-new-tokens", "64" if tiny else "256",
                         "--no-chat", "--json")
        new, rate = r["stats"]["new_tokens"], r["tokens_per_second"]
        return {"new_tokens": new, "tokens_per_second": rate, "summary": f"{new} tokens at {rate:.1f} tok/s"}

    check.step("gemma3-shaped fp16", gemma_half)

    def train():
        store, run = work / "data", work / "run"
        check.dspark("data", "regen", "--prompts", str(REPO / "data/prompts/pool.jsonl"), "--store", str(store),
                     "--limit", "16" if tiny else "64", "--max-new-tokens", "32" if tiny else "128",
                     "--model", str(smol), "--device", device, "--json")
        common = ["train", "--data", str(store), "--out", str(run), "--model", str(smol), "--device", device,
                  "--save-every", "10", "--log-every", "5", "--max-length", "128" if tiny else "512",
                  "--anchors", "8" if tiny else "32", "--draft-vocab", "1024", "--max-epochs", "1000"]
        check.dspark(*common, "--steps", "10")
        check.dspark(*common, "--steps", "20")
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
        steps = [row.get("step") for row in log if "step" in row]
        latest = (run / "latest").read_text().strip()
        return {"logged_steps": steps, "latest": latest, "summary": f"latest {latest}, logged steps {steps}"}

    check.step("train 10 + resume 20", train)

    def profiler():
        import torch
        from torch.profiler import ProfilerActivity, profile as torch_profile

        from dspark.engine.build import build_engine
        from dspark.engine.request import GenerationRequest
        from dspark.target import TargetModel

        target = TargetModel.load(str(smol), device=device)
        engine = build_engine(target, spec, "fixed:4", max_batch=4)
        requests = [GenerationRequest(target.encode_prompt(f"Tell me about the number {i}."), max_new_tokens=20, seed=i)
                    for i in range(4)]
        engine.generate(requests[:1])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            result = engine.generate(requests)
        sort = "self_cuda_time_total" if ProfilerActivity.CUDA in activities else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        (check.out / "profiler.txt").write_text(f"{len(result.stats.steps)} batched steps\n{table}\n", encoding="utf-8")
        return {"steps": len(result.stats.steps), "summary": f"{len(result.stats.steps)} steps, top ops in profiler.txt"}

    check.step("torch.profiler", profiler)
    check.log.close()
    ok = all(s["ok"] for s in check.steps)
    print(f"gpu_check: {'all steps passed' if ok else 'some steps FAILED'}; {check.out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
