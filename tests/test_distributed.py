"""Sweeps split across 2 processes (gloo, CPU) merge to exactly the single-process result."""
import os
import socket

import torch
import torch.multiprocessing as mp

import llm_common as C
import llm_data as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep():
    from conftest import make_llama as tiny_llama, make_tokenizer as byte_tokenizer
    from llm_evaluate_models import EvalConfig
    from llm_robustness_test import noise_sweep

    tok = byte_tokenizer()
    ids = D.tokenize_corpus(tok, "the quick brown fox jumps over the lazy dog. " * 12)
    res = noise_sweep(tiny_llama(), tok, ids, [0.1, 0.5, 1.0], [0, 1, 2], mode="relative", group="linears",
                      eval_config=EvalConfig(seq_len=64, eval_tokens=256), progress=False)
    return res.points, res.summary, res.doubling_eps


def _worker(rank, world, port, queue):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert C.init_distributed_from_env()
    try:
        points, summary, doubling = _sweep()
        assert C.dist_rank_world() == (rank, world)
        if rank == 0:
            queue.put((points, summary, doubling))
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_sweep_equals_single_process():
    single = _sweep()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    merged = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert merged[0] == single[0] and merged[1] == single[1] and merged[2] == single[2]
    assert len(merged[0]) == 9


def test_shard_jobs_single_process_is_identity():
    assert C.shard_jobs(["a", "b"]) == [(0, "a"), (1, "b")]
    assert C.gather_jobs([(1, "b"), (0, "a")]) == ["a", "b"]
