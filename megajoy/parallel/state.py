"""Loading whole (single-process) tensors into a rank's shards, and ordering work rank 0 must do first."""

import torch
import torch.distributed as dist

from megajoy.parallel.params import ParamSpec, local_slice


def load_full_model_state(model, state: dict[str, torch.Tensor], specs: dict[str, ParamSpec], pc,
                          source: str) -> None:
    """Copy this rank's shards out of full tensors, after checking every name (against the whole model:
    under pipeline parallelism the rank holds only its stages' part) and global shape."""
    expected = model.state_dict()
    if model.cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensor(s) missing, first {missing[0]!r}")
    whole = whole_model_names(model.cfg)
    unknown = [k for k in state if k not in whole]
    if unknown:
        raise ValueError(f"{source}: unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    with torch.no_grad():
        for name, target in expected.items():
            shape = specs[name].global_shape if name in specs else tuple(target.shape)
            if tuple(state[name].shape) != tuple(shape):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, the config "
                                 f"expects {tuple(shape)}")
            value = local_slice(state[name], specs[name], pc) if name in specs else state[name]
            target.copy_(value.to(target.device))


def whole_model_names(cfg) -> set[str]:
    from megajoy.model.transformer import JoyAIForCausalLM

    with torch.device("meta"):
        names = set(JoyAIForCausalLM(cfg).state_dict())
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def rank0_first(pc):
    """Context manager: rank 0 runs the body first (e.g. building a cache), then the others."""
    import contextlib

    @contextlib.contextmanager
    def ordered():
        distributed = dist.is_initialized() and pc.size("world") > 1
        if distributed and pc.rank != 0:
            dist.barrier()
        yield
        if distributed and pc.rank == 0:
            dist.barrier()

    return ordered()
