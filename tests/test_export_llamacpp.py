"""``dspark convert export --engine llama.cpp``: the folder llama.cpp's converter reads, and the converter run.

llama.cpp's own ``convert_hf_to_gguf.py`` writes the GGUF; dspark writes what it reads and runs
it. Here a stand-in converter records its arguments (the real one, with a built llama.cpp,
runs in ``benchmarks/speed/llamacpp_parity.py``; its JSON is committed). The stand-in checks what the
real converter's ``DSparkModel`` (llama.cpp ``conversion/qwen.py``, ``@ModelBase.register(
"Qwen3DSparkModel", ...)`` and its ``prepare_tensors``) needs: ``architectures``, a
``d2t`` of ``draft_vocab_size`` offsets whose absolute ids are unique and in range, and
``lm_head`` rows for a reduced vocabulary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark.drafters.dspark.interop import export_llamacpp
from dspark.errors import DsparkError
from test_convert import DRAFT_VOCAB, GAMMA, make_model, target  # noqa: F401  (the module fixture)

STAND_IN = '''
import json, sys
from pathlib import Path
from safetensors.torch import load_file
args = sys.argv[1:]
hf, out = Path(args[0]), Path(args[args.index("--outfile") + 1])
cfg = json.loads((hf / "config.json").read_text())
# conversion/qwen.py DSparkModel: registered names, n_vocab_draft, d2t -> absolute ids (unique, in range)
assert cfg["architectures"] == ["Qwen3DSparkModel"], cfg["architectures"]
tensors = load_file(str(hf / "model.safetensors"))
n_vocab, n_draft = cfg["vocab_size"], cfg.get("draft_vocab_size") or cfg["vocab_size"]
if n_draft < n_vocab:
    ids = tensors["d2t"].long() + __import__("torch").arange(n_draft)
    assert ids.numel() == n_draft and len(set(ids.tolist())) == n_draft and 0 <= int(ids.min()) and int(ids.max()) < n_vocab
    assert tensors["lm_head.weight"].shape[0] == n_draft
target_dir = Path(args[args.index("--target-model-dir") + 1])
assert (target_dir / "config.json").is_file()
out.write_text(json.dumps({"args": args, "outtype": args[args.index("--outtype") + 1]}))
'''


@pytest.fixture()
def converter(tmp_path) -> Path:
    path = tmp_path / "convert_hf_to_gguf.py"
    path.write_text(STAND_IN)
    return path


@pytest.mark.parametrize("vocab", [0, DRAFT_VOCAB], ids=["full-vocab", "draft-vocab"])
def test_export_runs_llamacpps_converter_on_the_folder_it_reads(target, tmp_path, converter, vocab):
    target.model.save_pretrained(tmp_path / "target")
    model = make_model(target, draft_vocab_size=vocab)
    report = export_llamacpp(model, tmp_path / "out", target, dtype=torch.float32, converter=converter,
                             target_dir=tmp_path / "target")
    written = json.loads((tmp_path / "out" / "draft-f32.gguf").read_text())
    assert written["outtype"] == "f32" and written["args"][0] == str(tmp_path / "out" / "hf")
    tensors = load_file(str(tmp_path / "out" / "hf" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values() if t.is_floating_point())
    assert ("d2t" in tensors) == bool(vocab)
    assert report.serve == (f"llama-server -m <target.gguf> -md {tmp_path / 'out' / 'draft-f32.gguf'} "
                            f"--spec-type draft-dspark --spec-draft-n-max {GAMMA}",)


def test_without_a_converter_the_exact_command_is_given(target, tmp_path):
    report = export_llamacpp(make_model(target), tmp_path / "out", target, target_dir=tmp_path / "target")
    command = [n for n in report.notes if n.startswith("convert with llama.cpp's own converter: ")]
    assert len(command) == 1 and f"{tmp_path / 'out' / 'hf'} --target-model-dir {tmp_path / 'target'}" in command[0]
    assert "--outfile " + str(tmp_path / "out" / "draft-f32.gguf") in command[0]
    assert not (tmp_path / "out" / "draft-f32.gguf").exists() and (tmp_path / "out" / "hf" / "config.json").is_file()


def test_a_failing_converter_is_one_line(target, tmp_path):
    broken = tmp_path / "convert_hf_to_gguf.py"
    broken.write_text("import sys\nprint('ValueError: d2t contains duplicate target ids', file=sys.stderr)\nsys.exit(1)\n")
    with pytest.raises(DsparkError, match="llama.cpp's converter failed \\(exit 1\\): ValueError: d2t contains duplicate"):
        export_llamacpp(make_model(target), tmp_path / "out", target, converter=broken, target_dir=tmp_path)
    with pytest.raises(DsparkError, match="is not a file"):
        export_llamacpp(make_model(target), tmp_path / "out2", target, converter=tmp_path / "missing.py")
    assert not (tmp_path / "out2").exists()


def test_convert_export_command_for_llamacpp(target, tmp_path, converter):
    from typer.testing import CliRunner

    from dspark.cli.main import app

    target.model.save_pretrained(tmp_path / "target")
    make_model(target, draft_vocab_size=DRAFT_VOCAB).save_pretrained(tmp_path / "drafter")
    args = ["convert", "export", str(tmp_path / "drafter"), str(tmp_path / "out"), "--model", str(tmp_path / "target"),
            "--engine", "llama.cpp", "--llama-cpp-converter", str(converter), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["engine"] == "llama.cpp" and summary["dtype"] == "float32"  # F32 by default for the CPU engine
    assert "--spec-type draft-dspark" in summary["serve"][0]
    wrong = CliRunner().invoke(app, [*args[:3], str(tmp_path / "out2"), "--engine", "vllm", "--llama-cpp-converter", str(converter)])
    assert wrong.exit_code == 2 and wrong.output.strip() == "error: --llama-cpp-converter goes with --engine llama.cpp"
    unknown = CliRunner().invoke(app, [*args[:3], str(tmp_path / "out3"), "--engine", "tgi"])
    assert unknown.output.strip() == "error: --engine must be one of vllm, sglang, llama.cpp, speculators, deepspec, got 'tgi'"


def test_engine_names_are_the_exporters():
    from dspark.cli.convert import ENGINES
    from dspark.drafters.dspark.interop import EXPORTERS

    assert ENGINES == tuple(EXPORTERS)
