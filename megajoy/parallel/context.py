"""The rank grid and its process groups, built once and passed down (never module globals).

Megatron's order: rank = tp + TP * (cp + CP * (dp + DP * pp)), tensor parallel fastest. Inside a
pipeline stage the TP x CP x DP ranks also form the expert grid EP x EDP (expert tensor parallel 1),
expert parallel fastest: stage_rank = tp + TP * (cp + CP * dp) = ep + EP * edp.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def stage(self) -> int:
        return self.tp * self.cp * self.dp

    @property
    def edp(self) -> int:
        return self.stage // self.ep

    def coords(self, rank: int) -> dict[str, int]:
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        stage_rank = rank % self.stage
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "ep": stage_rank % self.ep, "edp": stage_rank // self.ep}

    def rank_of(self, tp=0, cp=0, dp=0, pp=0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def group_ranks(self, name: str) -> list[list[int]]:
        """Every group of kind `name`, as lists of global ranks (each rank in exactly one)."""
        vary = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp",), "pp": ("pp",), "dp_cp": ("cp", "dp"),
                "stage": ("tp", "cp", "dp")}
        if name in ("ep", "edp"):
            return self._expert_groups(name)
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world):
            c = self.coords(rank)
            key = tuple(v for k, v in c.items() if k in ("tp", "cp", "dp", "pp") and k not in vary[name])
            groups.setdefault(key, []).append(rank)
        return list(groups.values())

    def _expert_groups(self, name: str) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world):
            c = self.coords(rank)
            key = (c["pp"], c["edp"]) if name == "ep" else (c["pp"], c["ep"])
            groups.setdefault(key, []).append(rank)
        return list(groups.values())


def resolve_layout(cfg, world: int, model_cfg=None, seq_length: int | None = None) -> Layout:
    """The layout for `world` ranks from a ParallelConfig, with one clear error for any misfit."""
    tp, pp, cp, ep = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                      cfg.context_parallel_size, cfg.expert_model_parallel_size)
    model_parallel = tp * pp * cp
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {model_parallel}")
    dp = world // model_parallel
    if cfg.data_parallel_size is not None and cfg.data_parallel_size != dp:
        raise ValueError(f"world size {world} != TP x CP x DP x PP = {tp} x {cp} x {cfg.data_parallel_size} x {pp} "
                         f"= {model_parallel * cfg.data_parallel_size}")
    layout = Layout(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep)
    if layout.stage % ep:
        raise ValueError(f"expert parallel size {ep} does not divide TP x CP x DP = {tp} x {cp} x {dp} = {layout.stage}")
    if cp > 1:
        raise ValueError(f"context_parallel_size={cp}: context parallelism is not implemented yet (use 1)")
    if model_cfg is not None:
        _check_model_fits(layout, model_cfg, cfg.sequence_parallel, seq_length)
    return layout


def _check_model_fits(layout: Layout, m, sequence_parallel: bool, seq_length: int | None) -> None:
    if m.num_attention_heads % layout.tp:
        raise ValueError(f"num_attention_heads={m.num_attention_heads} is not divisible by tensor parallel size {layout.tp}")
    if m.vocab_size % layout.tp:
        raise ValueError(f"vocab_size={m.vocab_size} is not divisible by tensor parallel size {layout.tp}")
    for name in ("intermediate_size",):
        if getattr(m, name) % layout.tp:
            raise ValueError(f"{name}={getattr(m, name)} is not divisible by tensor parallel size {layout.tp}")
    if m.n_routed_experts % layout.ep:
        raise ValueError(f"n_routed_experts={m.n_routed_experts} is not divisible by expert parallel size {layout.ep}")
    if layout.pp > 1 and m.num_nextn_predict_layers > 0 and m.tie_word_embeddings:
        raise ValueError("tie_word_embeddings with pipeline parallelism is not supported (untied, as JoyAI-Flash)")
    if seq_length is not None and layout.tp > 1 and seq_length % layout.tp:
        what = "sequence parallelism" if sequence_parallel else "MoE token sharding over tensor-parallel ranks"
        raise ValueError(f"seq_length={seq_length} is not divisible by tensor parallel size {layout.tp} ({what})")


@dataclass
class ParallelContext:
    """This rank's place in the grid, its process groups (None where a dimension has size 1) and the
    parallel options the model needs."""

    layout: Layout = field(default_factory=Layout)
    rank: int = 0
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    groups: dict = field(default_factory=dict)
    plan: tuple = ()  # every pipeline stage (StageSpec); empty: one stage holding the whole model
    pipeline_schedule: str = "1f1b"

    @classmethod
    def single(cls, device=None) -> "ParallelContext":
        return cls(device=device or torch.device("cpu"))

    def __post_init__(self):
        self.coords = self.layout.coords(self.rank)

    # sizes and ranks -------------------------------------------------------------------------
    def size(self, name: str) -> int:
        if name in ("embed", "ckpt"):
            group = self.groups.get(name)
            return dist.get_world_size(group) if group is not None else 1
        return {"tp": self.layout.tp, "cp": self.layout.cp, "dp": self.layout.dp, "pp": self.layout.pp,
                "ep": self.layout.ep, "edp": self.layout.edp, "dp_cp": self.layout.dp * self.layout.cp,
                "stage": self.layout.stage, "world": self.layout.world}[name]

    def group(self, name: str):
        """The process group of kind `name` containing this rank, or None when its size is 1."""
        return self.groups.get(name) if self.size(name) > 1 else None

    @property
    def tp(self):
        return self.group("tp")

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def ep_rank(self) -> int:
        return self.coords["ep"]

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def last_stage_pp_rank(self) -> int:
        """The pipeline rank running the last stage (head and loss): PP - 1, but 0 under ZB-V's V shape."""
        return self.plan[-1].pp_rank if self.plan else 0

    def local_stages(self, num_layers: int) -> tuple:
        """The pipeline stages this rank runs (all of the model when there is no pipeline)."""
        from megajoy.parallel.pipeline import single_stage

        if not self.plan:
            return single_stage(num_layers)
        return tuple(s for s in self.plan if s.pp_rank == self.coords["pp"])


def planning_context(cfg, world: int, rank: int, model_cfg, seq_length: int | None = None) -> ParallelContext:
    """This rank's context with placeholder groups: for building its modules on the meta device to
    measure them, without starting torch.distributed."""
    from megajoy.parallel.mappings import PlanningGroup
    from megajoy.parallel.pipeline import plan_stages

    layout = resolve_layout(cfg, world, model_cfg, seq_length)
    plan = ()
    if layout.pp > 1:
        plan = plan_stages(model_cfg.num_hidden_layers, layout.pp, cfg.virtual_pipeline_model_parallel_size,
                           cfg.pipeline_schedule, cfg.pipeline_layout)
    coords = layout.coords(rank)
    positions = {"tp": coords["tp"], "cp": coords["cp"], "dp": coords["dp"], "pp": coords["pp"],
                 "ep": coords["ep"], "edp": coords["edp"], "dp_cp": coords["cp"] + layout.cp * coords["dp"],
                 "stage": rank % layout.stage}
    pc = ParallelContext(layout, rank, cfg.sequence_parallel, cfg.use_distributed_optimizer,
                         torch.device("meta"), {}, plan, cfg.pipeline_schedule)
    pc.groups = {name: PlanningGroup(pc.size(name), position) for name, position in positions.items()}
    return pc


def build_context(cfg, rank: int, world: int, device: torch.device, model_cfg=None,
                  seq_length: int | None = None) -> ParallelContext:
    """Create every process group (all ranks call this in the same order) and this rank's context."""
    from megajoy.parallel.pipeline import plan_stages

    layout = resolve_layout(cfg, world, model_cfg, seq_length)
    plan = ()
    if layout.pp > 1 and model_cfg is not None:
        plan = plan_stages(model_cfg.num_hidden_layers, layout.pp, cfg.virtual_pipeline_model_parallel_size,
                           cfg.pipeline_schedule, cfg.pipeline_layout)
    groups = {}
    if world > 1:
        for name in ("tp", "cp", "dp", "pp", "dp_cp", "stage", "ep", "edp"):
            for ranks in layout.group_ranks(name):
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[name] = group
        for ranks in _embedding_groups(layout, plan):
            group = dist.new_group(ranks)
            if rank in ranks:
                groups["embed"] = group
        groups["world"] = dist.group.WORLD
        # Background checkpoint writes synchronise on their own gloo group, never on the training one.
        groups["ckpt"] = dist.new_group(backend="gloo")
        if layout.pp > 1 and dist.get_backend() == "nccl":
            # NCCL forms a group's communicator at its first use, and a batched P2P that is that first use
            # must involve every rank of the group; a pipeline's first ones involve two. A collective first.
            dist.barrier(group=groups["pp"], device_ids=[device.index])
    return ParallelContext(layout, rank, cfg.sequence_parallel, cfg.use_distributed_optimizer, device, groups,
                           plan, cfg.pipeline_schedule)


def _embedding_groups(layout: Layout, plan: tuple) -> list[list[int]]:
    """Pairs (first-stage rank, last-stage rank) holding the two copies of the embedding, when distinct."""
    if not plan or plan[0].pp_rank == plan[-1].pp_rank:
        return []
    first, last = plan[0].pp_rank, plan[-1].pp_rank
    return [[layout.rank_of(tp, cp, dp, first), layout.rank_of(tp, cp, dp, last)]
            for dp in range(layout.dp) for cp in range(layout.cp) for tp in range(layout.tp)]
