"""Key statistics in a process group (gloo, 2 CPU processes) equal those of one process; the
export/import of statistics between machines."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from tiny_models import tiny_model, tiny_tokenizer

from metake.corpus import TextCorpus
from metake.errors import CorpusError
from metake.stats import (
    StatsCache,
    cache_keys,
    compute_second_moments,
    export_moments,
    get_second_moments,
    import_moments,
)

TEXTS = [f"Text {i}: the river {'x' * (i % 7)} flows past town number {i}." for i in range(11)]
LAYERS = [0, 1]
OPTIONS = dict(num_samples=10, max_length=24, batch_size=3, progress=False)  # 10 of 11 texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    """One process of the group: statistics uncached and through a cache shared by all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer(with_pad=False)
        corpus = TextCorpus.from_texts(TEXTS, name="texts")
        plain = compute_second_moments(model, tokenizer, LAYERS, corpus, **OPTIONS)
        cache = StatsCache(os.path.join(folder, "cache"))
        cached = get_second_moments(model, tokenizer, LAYERS, corpus, model_id="tiny",
                                    cache=cache, **OPTIONS)  # fmt: skip
        torch.save({"plain": {k: (v.mom2, v.num_tokens) for k, v in plain.items()},
                    "cached": {k: (v.mom2, v.num_tokens) for k, v in cached.items()}},
                   os.path.join(folder, f"rank{rank}.pt"))  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def _single_process() -> dict:
    model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer(with_pad=False)
    corpus = TextCorpus.from_texts(TEXTS, name="texts")
    return compute_second_moments(model, tokenizer, LAYERS, corpus, **OPTIONS)


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    want = _single_process()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:  # every rank holds the whole sums, uncached or through the cache
        for kind in ("plain", "cached"):
            for layer in LAYERS:
                mom2, tokens = result[kind][layer]
                assert tokens == want[layer].num_tokens
                torch.testing.assert_close(mom2, want[layer].mom2, rtol=1e-9, atol=1e-12)
                assert not torch.equal(mom2, torch.zeros_like(mom2))
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == len(LAYERS)  # rank 0 wrote each layer once
    with safe_open(str(files[0]), framework="pt") as f:
        assert int(f.metadata()["num_tokens"]) == want[LAYERS[0]].num_tokens


def test_export_then_import_on_another_cache(tmp_path):
    model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer(with_pad=False)
    corpus = TextCorpus.from_texts(TEXTS, name="texts")
    here = StatsCache(tmp_path / "here")
    moments = get_second_moments(model, tokenizer, LAYERS, corpus, model_id="tiny", cache=here,
                                 **OPTIONS)  # fmt: skip
    keys = cache_keys(model, LAYERS, corpus, model_id="tiny", num_samples=10, max_length=24,
                      accum_dtype=torch.float64, autocast=None)  # fmt: skip
    exported = export_moments(tmp_path / "c0.safetensors", moments, keys, corpus.name)

    there = StatsCache(tmp_path / "there")  # another machine: its own cache and model name
    imported = import_moments(exported, tiny_model("llama", seed=1), "my-tiny", cache=there)
    assert sorted(imported) == LAYERS
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    found = get_second_moments(model, tokenizer, LAYERS, corpus, model_id="my-tiny", cache=there,
                               **OPTIONS)  # fmt: skip
    assert not calls  # read from the imported cache, nothing computed
    for layer in LAYERS:
        torch.testing.assert_close(found[layer].mom2, moments[layer].mom2, rtol=0, atol=0)
        assert found[layer].num_tokens == moments[layer].num_tokens

    with pytest.raises(CorpusError, match="other weights"):
        import_moments(exported, tiny_model("llama", seed=2), "my-tiny", cache=there)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorpusError, match="cannot read"):
        import_moments(tmp_path / "junk.safetensors", model, "my-tiny", cache=there)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_stats_equals_one_process(model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m metake stats --export` equals a single process's export."""
    folder, corpus = model_dir
    common = ["stats", "--model", str(folder), "--corpus", str(corpus), "--layers", "0,1",
              "--samples", "12", "--device", "cpu", "--no-stats-cache"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.safetensors"
    one = tmp_path / "one.safetensors"
    run = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "metake", *common,
         "--export", str(two)], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("layer 0: C0") == 1  # rank 0 prints, once
    assert "in 2 processes" in run.stdout
    run = subprocess.run([sys.executable, "-m", "metake", *common, "--export", str(one)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    with safe_open(str(two), framework="pt") as a, safe_open(str(one), framework="pt") as b:
        assert a.metadata()["num_tokens"] == b.metadata()["num_tokens"]
        for name in b.keys():  # noqa: SIM118
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=1e-9, atol=0)
