"""Parallel building blocks against their single-process references, the rank grid and the launcher."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megajoy.parallel.spawn import run_workers, slurm_env
from megajoy.config import ParallelConfig
from megajoy.launch import first_host, launch_env
from megajoy.parallel.context import Layout, resolve_layout


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """||a - b|| / ||b|| <= tol."""
    return ((a - b).norm() / b.norm()).item() <= tol


def _init(rank, world):
    from megajoy.launch import init_distributed

    init_distributed(launch_env())


# ------------------------------------------------------------------------------------------------ layers

def _tp_layers_worker(rank, world, sp):
    from megajoy.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megajoy.parallel.mappings import enter_tp, gather_along, split_along

    _init(rank, world)
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, generator=g, requires_grad=True)
    w1, w2 = torch.randn(20, 12, generator=g), torch.randn(12, 20, generator=g)
    emb, ids = torch.randn(16, 12, generator=g), torch.randint(0, 16, (2, 8), generator=g)
    col, row = ColumnParallelLinear(12, 20, group), RowParallelLinear(20, 12, group)
    vocab = VocabParallelEmbedding(16, 12, group)
    with torch.no_grad():
        col.weight.copy_(w1.chunk(world, 0)[rank])
        row.weight.copy_(w2.chunk(world, 1)[rank])
        vocab.weight.copy_(emb.chunk(world, 0)[rank])
    # MLP-shaped block: (split sequence with SP) enter -> column -> row exit
    x_in = split_along(x, group, 1) if sp else x
    y = row.forward_exit(torch.relu(col(enter_tp(x_in, group, sp))), sp)
    y_full = gather_along(y, group, 1, grad_is_partial=False) if sp else y
    (y_full * torch.arange(12.0)).sum().backward()
    e = vocab(ids, sp)
    e_full = gather_along(e, group, 1, grad_is_partial=False) if sp else e
    logits_local = torch.randn(2 * 8, 16, generator=g).chunk(world, 1)[rank].requires_grad_()
    targets = torch.randint(0, 16, (16,), generator=g).index_fill_(0, torch.tensor([3, 11]), -100)
    ce = vocab_parallel_cross_entropy(logits_local, targets, group)
    ce.sum().backward()
    return y_full.detach(), x.grad, e_full.detach(), ce.detach(), logits_local.grad


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_layers_match_unsharded(sp):
    results = run_workers(2, _tp_layers_worker, sp)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, generator=g, requires_grad=True)
    w1, w2 = torch.randn(20, 12, generator=g), torch.randn(12, 20, generator=g)
    emb, ids = torch.randn(16, 12, generator=g), torch.randint(0, 16, (2, 8), generator=g)
    y = F.linear(torch.relu(F.linear(x, w1)), w2)
    (y * torch.arange(12.0)).sum().backward()
    logits = torch.randn(16, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 16, (16,), generator=g).index_fill_(0, torch.tensor([3, 11]), -100)  # ignored
    ce = F.cross_entropy(logits, targets, reduction="none")
    assert ce[3] == 0 and ce[11] == 0
    ce.sum().backward()
    for rank, (y_tp, x_grad, e_tp, ce_tp, logits_grad) in enumerate(results):
        assert close(y_tp, y) and close(x_grad, x.grad)
        assert close(e_tp, F.embedding(ids, emb))
        assert close(ce_tp, ce) and close(logits_grad, logits.grad.chunk(2, 1)[rank])


def test_every_negative_target_is_ignored_on_one_rank():
    """As on several ranks: -1 or -7 is an ignored target (F.cross_entropy refused it as out of bounds)."""
    from megajoy.parallel.cross_entropy import vocab_parallel_cross_entropy

    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    targets = torch.tensor([3, -1, 15, -7, -100])
    loss = vocab_parallel_cross_entropy(logits, targets)
    loss.sum().backward()
    kept = torch.tensor([0, 2])
    expected = -torch.log_softmax(logits.detach()[kept], -1)[torch.arange(2), targets[kept]]
    assert torch.allclose(loss[kept], expected) and loss[[1, 3, 4]].tolist() == [0.0, 0.0, 0.0]
    assert logits.grad[[1, 3, 4]].abs().sum() == 0


def _dispatch_worker(rank, world):
    from megajoy.model.moe import TokenDispatcher
    from megajoy.parallel.expert_parallel import ExpertParallelDispatcher

    _init(rank, world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(10, 6, generator=g, requires_grad=True)
    ids = torch.randint(0, 8, (10, 3), generator=g)
    weights = torch.rand(10, 3, generator=g)
    dispatcher = ExpertParallelDispatcher(8, dist.group.WORLD)
    x_local, counts, meta = dispatcher.dispatch(x, ids)
    # Expert e multiplies by (e + 1): with 2 experts per rank, local expert l is 2 * rank + l.
    scale = torch.repeat_interleave(torch.arange(2) + 2 * rank + 1.0, counts).unsqueeze(1)
    y = dispatcher.combine(x_local * scale, weights, meta)
    y.sum().backward()
    ref_dispatcher = TokenDispatcher(8)
    xr = x.detach().clone().requires_grad_()
    xr_perm, ref_counts, ref_meta = ref_dispatcher.dispatch(xr, ids)
    yr = ref_dispatcher.combine(xr_perm * torch.repeat_interleave(torch.arange(8) + 1.0, ref_counts).unsqueeze(1),
                                weights, ref_meta)
    yr.sum().backward()
    return y.detach(), yr.detach(), x.grad, xr.grad, int(counts.sum())


def test_expert_parallel_dispatch_combine_round_trip():
    """Dispatch -> per-expert function -> combine over 4 ranks equals the single-process dispatcher,
    forward and backward, with uneven token counts per rank and expert."""
    results = run_workers(4, _dispatch_worker)
    for y, yr, g, gr, _ in results:
        assert close(y, yr) and close(g, gr)
    assert sum(r[4] for r in results) == 4 * 10 * 3  # every token copy arrived somewhere


def _skewed_moe(routing: str):
    """An MoE block (8 experts, top 3, balance loss on) with random weights, its input and a loss weight.
    'one_rank': the bias sends every token to experts 0-2 (under EP 4, ranks 2 and 3 receive nothing);
    'ties': every expert scores the same for every token."""
    from helpers import small_config
    from megajoy.model.moe import MoE

    g = torch.Generator().manual_seed(0)
    moe = MoE(small_config(num_experts_per_tok=3, aux_loss_alpha=0.1)).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if routing == "one_rank":
            moe.gate.e_score_correction_bias.copy_(torch.tensor([9.0, 9, 9, 0, 0, 0, 0, 0]))
        else:
            moe.gate.weight.copy_(moe.gate.weight[:1].expand_as(moe.gate.weight))
    return moe, torch.randn(4, 6, 64, generator=g), torch.randn(4, 6, 64, generator=g)


def _skewed_moe_worker(rank, world, routing):
    from megajoy.model.moe import MoE
    from megajoy.parallel.context import build_context

    _init(rank, world)
    pc = build_context(ParallelConfig(expert_model_parallel_size=world), rank, world, torch.device("cpu"))
    ref, x, weight = _skewed_moe(routing)
    moe = MoE(ref.cfg, pc).train()
    moe.aux_loss_scale = 1 / world  # the trainer's 1 / (micro-batches x data-parallel ranks)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            full = ref.get_parameter(name)
            p.copy_(full.chunk(world)[rank] if name.startswith("experts.") else full)
        moe.gate.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
    x = x.chunk(world)[rank].requires_grad_()  # each data-parallel rank its own sequence
    y = moe(x)
    (y * weight.chunk(world)[rank]).sum().backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    for name, grad in grads.items():
        if not name.startswith("experts."):  # replicated: summed over the data-parallel ranks
            dist.all_reduce(grad)
    return y.detach(), x.grad, grads, moe.gate.expert_load


@pytest.mark.parametrize("routing", ["one_rank", "ties"])
def test_expert_parallel_moe_with_idle_ranks_matches_one_process(routing):
    """The whole MoE block (router, balance loss, EP 4 dispatch, experts, shared expert) with skewed routing:
    outputs, input gradients, every weight's gradient and the summed expert load equal one process's."""
    ref, x, weight = _skewed_moe(routing)
    y_want = ref(x.requires_grad_())
    (y_want * weight).sum().backward()
    results = run_workers(4, _skewed_moe_worker, routing)
    assert sum(r[3] for r in results).tolist() == ref.gate.expert_load.tolist()
    for rank, (y, x_grad, grads, _) in enumerate(results):
        assert close(y, y_want.detach()[rank:rank + 1], 1e-5) and close(x_grad, x.grad[rank:rank + 1], 1e-5)
        for name, p in ref.named_parameters():
            want = p.grad.chunk(4)[rank] if name.startswith("experts.") else p.grad
            assert close(grads[name], want, 1e-5) if want.norm() > 0 else grads[name].norm() == 0, name


# ------------------------------------------------------------------------------------------------ grid

def test_layout_coordinates_and_groups():
    layout = Layout(tp=2, dp=2, pp=2, ep=2)
    assert layout.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.group_ranks("ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.group_ranks("edp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.group_ranks("stage") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert Layout(tp=2, dp=4, ep=4).group_ranks("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert Layout(tp=2, dp=4, ep=4).group_ranks("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.coords(5) == {"tp": 1, "cp": 0, "dp": 0, "pp": 1, "ep": 1, "edp": 0}


@pytest.mark.parametrize("kw, world, message", [
    (dict(tensor_model_parallel_size=3), 4, "world size 4 is not divisible by TP x PP x CP = 3 x 1 x 1 = 3"),
    (dict(tensor_model_parallel_size=2, data_parallel_size=3), 4, "world size 4 != TP x CP x DP x PP = 2 x 1 x 3 x 1 = 6"),
    (dict(expert_model_parallel_size=3), 4, "expert parallel size 3 does not divide TP x CP x DP = 1 x 1 x 4 = 4"),
    (dict(tensor_model_parallel_size=8), 8, "num_attention_heads=4 is not divisible by tensor parallel size 8"),
    (dict(expert_model_parallel_size=32), 32, "n_routed_experts=16 is not divisible by expert parallel size 32"),
    (dict(context_parallel_size=2), 2, "context parallelism is not implemented yet"),
])
def test_layout_errors_name_the_numbers(kw, world, message):
    from megajoy.config import tiny

    with pytest.raises(ValueError) as e:
        resolve_layout(ParallelConfig(**kw), world, tiny())
    assert message in str(e.value)


def test_fewer_layers_than_stages_run_with_an_explicit_layout():
    """More pipeline stages than layers need --pp-layout with empty stages, as the error says; the layout check
    used to refuse the model before the layout was read, so the advice could not be followed."""
    from megajoy.config import tiny
    from megajoy.parallel.context import planning_context

    interleaved = dict(pipeline_model_parallel_size=4, pipeline_schedule="interleaved",
                       virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="fewer than the 8 pipeline stages .* give --pp-layout with empty stages"):
        planning_context(ParallelConfig(**interleaved), 4, 0, tiny())
    cfg = ParallelConfig(**interleaved, pipeline_layout=[1, 0, 1, 0, 0, 1, 0, 1])
    assert [s.layers for s in planning_context(cfg, 4, 0, tiny()).plan] == [(0,), (), (1,), (), (), (2,), (), (3,)]


def test_a_pipeline_rank_with_nothing_to_hold_is_refused():
    """A rank whose stages are all empty has no weights: training failed in the optimizer ("empty parameter
    list") and decoding on its first parameter. The layout check names it; an empty stage beside a full one
    on the same rank, or one holding only the head, stays fine."""
    from megajoy.config import tiny
    from megajoy.parallel.context import planning_context

    cfg = ParallelConfig(pipeline_model_parallel_size=3, pipeline_layout=[2, 0, 2])
    with pytest.raises(ValueError, match=r"--pp-layout \[2, 0, 2\] leaves pipeline rank\(s\) \[1\] without any layer"):
        planning_context(cfg, 3, 0, tiny())
    head_only = ParallelConfig(pipeline_model_parallel_size=2, pipeline_layout=[4, 0])
    assert [s.layers for s in planning_context(head_only, 2, 0, tiny()).plan] == [(0, 1, 2, 3), ()]


def test_sequence_length_must_split_over_tp():
    from megajoy.config import tiny

    with pytest.raises(ValueError, match="seq_length=30 is not divisible by tensor parallel size 4"):
        resolve_layout(ParallelConfig(tensor_model_parallel_size=4), 4, tiny(), seq_length=30)


# ------------------------------------------------------------------------------------------------ launch

def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[01-04,07]") == "gpu01"
    assert first_host("a[3-5,9],b1") == "a3"
    assert first_host("node-1,node-2") == "node-1"
    assert first_host("single") == "single"


def test_first_host_keeps_what_follows_a_range():
    """Slurm's hostlist expressions are prefix[ranges]suffix, brackets repeatable (`scontrol show hostnames`
    expands 'node[1-2]-ib' to node1-ib, node2-ib); before, the first host lost all after its first bracket."""
    assert first_host("node[1-2]-ib") == "node1-ib"
    assert first_host("foo[0-4]-eth2,bar1") == "foo0-eth2"
    assert first_host("rack[01-3]-node[01-2,5]") == "rack01-node01"
    assert first_host("x[10-11]y[2]z") == "x10y2z"
    with pytest.raises(ValueError, match="cannot read a host name"):
        first_host(",a")


def test_launch_env_from_torchrun_and_slurm():
    env = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3, 8, 1, "h", 1234, "torchrun")
    env = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        5, 8, 1, "gpu07", 21230, "slurm")
    assert launch_env({}).source == "single"


# What srun sets for the 4 tasks of step 1 of job 123 on the last two nodes of a four-node allocation
# (Slurm's env_array_for_step: SLURM_NODELIST keeps the job's list, SLURM_NTASKS may hold the job's count).
STEP = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0",
        "SLURM_NODELIST": "gpu[01-04]", "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123",
        "SLURM_STEP_ID": "1"}


def test_srun_step_meets_on_its_own_first_node_and_port():
    """Two steps of one job (`srun -N2 ... &` twice) meet each on the first node of its own node list, on ports
    of their own. Before, both went to the job's first node (not in the second step) on the job's one port."""
    first, second = launch_env({**STEP, "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_ID": "0"}), launch_env(STEP)
    assert (first.master_addr, second.master_addr) == ("gpu01", "gpu03")
    assert (first.master_port, second.master_port) == (21230, 21231)
    assert (second.rank, second.world_size, second.source) == (2, 4, "slurm")
    given = launch_env({**STEP, "MASTER_PORT": "6000", "MASTER_ADDR": "h"})
    assert (given.master_addr, given.master_port) == ("h", 6000)


def test_a_batch_script_without_srun_runs_one_process(capsys):
    """The batch script itself sees SLURM_PROCID=0 and the job's SLURM_NTASKS but no SLURM_STEP_* variables:
    run alone, saying so. Before, it waited for 7 ranks that no one would start."""
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "123"}
    env = launch_env(batch)
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")
    assert "SLURM_NTASKS=8 but this process was not started by srun" in capsys.readouterr().err


def _slurm_groups_worker(rank, world):
    from megajoy.launch import setup_parallel
    from megajoy.config import load_job_config

    job = load_job_config("tiny", None, ["parallel.tensor_model_parallel_size=2",
                                         "parallel.expert_model_parallel_size=4"])
    pc = setup_parallel(job)
    members = {name: dist.get_process_group_ranks(pc.groups[name]) for name in ("tp", "dp", "ep", "edp", "stage")}
    probe = torch.tensor([float(rank)])
    dist.all_reduce(probe, group=pc.group("tp"))
    env = launch_env()
    return members, probe.item(), (env.source, env.local_rank, env.master_addr)


def test_slurm_variables_for_two_nodes_build_the_right_groups():
    """8 ranks started as srun would (2 nodes x 4 tasks, SLURM_* only) with TP 2, EP 4 (so DP 4)."""
    results = run_workers(8, _slurm_groups_worker, env_fn=slurm_env)
    for rank, (members, probe, (source, local_rank, master)) in enumerate(results):
        assert (source, local_rank, master) == ("slurm", rank % 4, "127.0.0.1")
        assert members["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert members["dp"] == [rank % 2 + 2 * i for i in range(4)]
        assert members["ep"] == [4 * (rank // 4) + i for i in range(4)]
        assert members["edp"] == [rank % 4, rank % 4 + 4]
        assert members["stage"] == list(range(8))
        assert probe == 2 * (rank - rank % 2) + 1  # the TP group really communicates


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fused AdamW runs on a CUDA GPU"))])
def test_adamw_state_loaded_for_a_resume_steps_as_the_saved_optimizer(device):
    """A resumed AdamW state (the pattern of load_local_state) steps exactly as the optimizer it was saved
    from; on a GPU the fused kernel reads the step count on the device, where torch itself keeps it."""
    from megajoy.config import OptimizerConfig
    from megajoy.optim import adamw
    from megajoy.parallel.optimizer import STATE_KEYS, _adam_step

    def build(tensor):
        p = torch.nn.Parameter(tensor.clone())
        return p, adamw([{"params": [p], "weight_decay": 0.1, "lr_mult": 1.0}], OptimizerConfig(lr=0.01))

    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(64, generator=g).to(device), [torch.randn(64, generator=g).to(device) for _ in range(2)]
    p, optimizer = build(start)
    p.grad = grads[0]
    optimizer.step()
    twin, resumed = build(p.detach())
    state = optimizer.state[p]
    resumed.state[twin] = {"step": _adam_step(resumed, float(state["step"]), twin),
                           **{k: state[k].clone() for k in STATE_KEYS}}
    p.grad, twin.grad = grads[1], grads[1].clone()
    optimizer.step()
    resumed.step()
    assert torch.equal(twin, p)
    assert resumed.state[twin]["step"].device == state["step"].device


def test_every_batch_size_of_a_ramp_must_split_over_micro_batches_and_dp():
    """Checked at start-up for each size the ramp steps through (2, 4, 6, 8 here), not at the step that has it."""
    import types

    from megajoy.config import load_job_config
    from megajoy.parallel.context import planning_context
    from megajoy.train.trainer import Trainer

    job = load_job_config("tiny", None, ["train.global_batch_size=8", "train.micro_batch_size=1",
                                         "train.rampup_batch_size=[2, 2, 16]"])
    check = Trainer._check_batch_layout
    check(types.SimpleNamespace(job=job, pc=planning_context(ParallelConfig(), 2, 0, job.model, 64)))
    with pytest.raises(ValueError, match="batch size 2 is not divisible by micro_batch_size x data-parallel size "
                                         r"= 1 x 4 = 4"):
        check(types.SimpleNamespace(job=job, pc=planning_context(ParallelConfig(), 4, 0, job.model, 64)))


# ------------------------------------------------------------------------------------------------ pipeline

def _mtp_batches(vocab: int):
    from megajoy.data.packing import Batch

    ids = torch.randint(0, vocab, (4, 17), generator=torch.Generator().manual_seed(0))
    positions, documents = torch.arange(16).expand(1, -1), torch.zeros(1, 16, dtype=torch.long)
    return [Batch(ids[i:i + 1, :-1], ids[i:i + 1, 1:], torch.ones(1, 16), positions, documents) for i in range(4)]


def _mtp_objective(out, batch):
    return (out.lm_loss_sum + out.mtp_loss_sum) / 64, {}


def _zero_bubble_mtp_job():
    from helpers import TINY_MODEL_OVERRIDES
    from megajoy.config import load_job_config

    return load_job_config("tiny", None, TINY_MODEL_OVERRIDES + [
        "model.num_hidden_layers=4", "model.num_nextn_predict_layers=2", "parallel.pipeline_model_parallel_size=2",
        "parallel.pipeline_schedule=zero-bubble"])


def _single_process_grads(job):
    from megajoy.model import create_model

    model = create_model(job.model, seed=3).train()
    for batch in _mtp_batches(job.model.vocab_size):
        out = model(batch.input_ids, batch.position_ids, batch.document_ids, batch.labels, batch.loss_mask,
                    compute_mtp=True, return_logits=False)
        _mtp_objective(out, batch)[0].backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _zero_bubble_mtp_worker(rank, world):
    """(this rank's gradients after a zero-bubble step, rank 0: one process's gradients of the same step)"""
    from megajoy.launch import setup_parallel
    from megajoy.model import create_model
    from megajoy.parallel.pipeline import PipelineRunner

    job = _zero_bubble_mtp_job()
    reference = _single_process_grads(job) if rank == 0 else None
    pc = setup_parallel(job)
    model = create_model(job.model, pc=pc, seed=3).train()
    PipelineRunner(model, pc).run(_mtp_batches(job.model.vocab_size), _mtp_objective, True, backward=True)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, reference


def test_zero_bubble_weight_pass_with_two_mtp_depths():
    """ZB-V over PP 2 with MTP depths 1 and 2: the last stage's embedding feeds both depths, and the second
    feeds on the first's output. torch's weight pass walks from the second use back through the first depth's
    layer, which another parameter group still needs (before: "backward through the graph a second time").
    Each rank's gradients equal one process's."""
    results = run_workers(2, _zero_bubble_mtp_worker)
    reference, got = results[0][1], {}
    for grads, _ in results:
        got.update(grads)
    assert got.keys() == reference.keys()
    worst = max((((got[n] - g).norm() / g.norm()).item(), n) for n, g in reference.items() if g.norm() > 0)
    assert worst[0] <= 1e-5, worst
