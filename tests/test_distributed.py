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


def _pipeline_worker(rank, world, port, argv, queue):
    """One rank of ``accelerate launch llm_main_v4.py ...``: records which grid points it pruned
    and how many variants it evaluated and zero-shot scored."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import llm_evaluate_models as E
    import llm_main_v4 as M
    import llm_prune_model as P

    pruned, evaluated = [], []
    prune, evaluate = P.prune_model, E.evaluate_model
    P.prune_model = lambda m, t, c, point, shared=None: pruned.append(point.variant_name(True)) or \
        prune(m, t, c, point, shared)
    E.evaluate_model = lambda m, *a, **kw: evaluated.append("eval") or evaluate(m, *a, **kw)
    import lm_eval

    zeroshot = lm_eval.simple_evaluate
    lm_eval.simple_evaluate = lambda *a, **kw: evaluated.append("zeroshot") or zeroshot(*a, **kw)
    try:
        queue.put((rank, M.main(argv), pruned, (evaluated.count("eval"), evaluated.count("zeroshot"))))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_grid_under_two_ranks_splits_its_points_and_equals_one_process(tiny_run_dir, tmp_path):
    """Issue 24: under accelerate launch / torchrun the ranks prune, evaluate and zero-shot disjoint variants
    of a grid, and the run's results equal a single process's, variant for variant; issue 31: the noise
    sweep and the analysis of every variant likewise."""
    import json

    import llm_main_v4 as M
    from conftest import tiny_argv

    from test_zeroshot import write_local_task

    write_local_task(tmp_path / "tasks", n=6)
    grid = ["--steps", "prune,noise,eval,zeroshot,analysis", "--prune-method", "magnitude,wanda",
            "--sparsity", "0.4,0.6", "--tasks", "tiny_qa", "--tasks-include", str(tmp_path / "tasks"),
            # the noise sweep and the analysis of every variant, split over the ranks too (issue 31)
            "--sweep-eps", "0.1,1", "--sweep-seeds", "2", "--sweep-tokens", "64", "--sweep-seq-len", "32",
            "--protect-fraction", "0", "--hessian-probes", "2", "--power-iters", "2", "--analysis-windows", "1",
            "--analysis-seq-len", "16", "--analysis-eval-tokens", "64", "--analysis-eval-seq-len", "32"]
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "one", *grid)) == 0
    ctx, port = mp.get_context("spawn"), _free_port()
    queue = ctx.Queue()
    argv = tiny_argv(tiny_run_dir, tmp_path / "two", *grid)
    procs = [ctx.Process(target=_pipeline_worker, args=(r, 2, port, argv, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert [rc for _, rc, _, _ in got] == [0, 0]
    (_, _, pruned0, evals0), (_, _, pruned1, evals1) = got
    names = ["pruned[magnitude,0.4,unstructured]", "pruned[magnitude,0.6,unstructured]",
             "pruned[wanda,0.4,unstructured]", "pruned[wanda,0.6,unstructured]"]
    assert pruned0 == names[0::2] and pruned1 == names[1::2]  # disjoint, every world_size-th point
    assert (evals0, evals1) == ((3, 3), (3, 3))  # base, four pruned and the noisy variant, split 3/3
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["perplexity"] == one["perplexity"] and list(two["perplexity"]) == ["base", *names, "noisy"]
    assert two["zeroshot"]["tasks"] == one["zeroshot"]["tasks"] and list(two["zeroshot"]["tasks"]) == ["base", *names,
                                                                                                     "noisy"]
    for step in ("noise", "analysis"):  # every variant measured once over the ranks, as by one process
        assert list(two[step]["variants"]) == ["base", *names, "noisy"]
        assert two[step]["variants"] == one[step]["variants"], step
    for a, b in zip(one["prune"]["grid"], two["prune"]["grid"]):
        assert (a["name"], a["overall_sparsity"], a["layer_sparsity"]) == (b["name"], b["overall_sparsity"],
                                                                            b["layer_sparsity"])
        # the same masks (not the same bytes: safetensors writes its metadata map in a per-process order)
        (ma, ta), (mb, tb) = (_tensors_and_metadata(tmp_path / d / r["checkpoint"]) for d, r in (("one", a), ("two", b)))
        assert ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _tensors_and_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
