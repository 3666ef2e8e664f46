"""`megajoy pretrain`: next-token (and, once switched on, MTP) training on Megatron-format data or the
built-in corpus. Data and loss live here; everything else is the shared training loop."""

from megajoy.cli import add_config_arguments
from megajoy.optim.schedules import total_samples
from megajoy.stages.flags import add_training_flags, flag_overrides
from megajoy.train.trainer import NextTokenStage, Trainer

# Section defaults per model preset; the tiny preset uses the dataclass defaults (sized for a CPU).
RECIPES = {
    "joyai-flash": {"optimizer": {"optimizer": "muon", "lr": 4.2e-4, "min_lr": 4.2e-5, "lr_warmup_iters": 2000},
                    "data": {"seq_length": 4096}, "train": {"micro_batch_size": 1, "global_batch_size": 32}},
}
RECIPES["joyai-slice"] = RECIPES["joyai-flash"]


class PretrainStage(NextTokenStage):
    name = "pretrain"

    def __init__(self, blend: list[str], tokenizer):
        self.blend, self.tokenizer = blend, tokenizer

    def setup(self, trainer: Trainer) -> None:
        from megajoy.data.pretrain import PretrainData

        cfg, dp = trainer.job.train, trainer.pc.size("dp_cp")
        self.dp_rank = trainer.pc.coords["dp"] + trainer.pc.coords["cp"] * trainer.pc.size("dp")
        self.dp = dp
        self.data = PretrainData(trainer.job, self.blend, self.tokenizer, total_samples(cfg, cfg.train_iters),
                                 cfg.eval_iters * cfg.global_batch_size)

    def train_micro_batches(self, trainer, consumed, global_batch):
        return self.data.train_micro_batches(consumed, global_batch, trainer.job.train.micro_batch_size,
                                             self.dp_rank, self.dp)

    def valid_micro_batches(self, trainer):
        return self.data.valid_micro_batches(trainer.job.train.micro_batch_size, self.dp_rank, self.dp)


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    add_training_flags(parser)


def build_job(args):
    from megajoy.config import load_job_config

    return load_job_config(args.preset, args.config, flag_overrides(args) + args.overrides,
                           defaults=RECIPES.get(args.preset or "tiny"))


def take_special_token_ids(model_cfg, tokenizer) -> None:
    """The model ends text with the token the data ends documents with, so exports stop generating there; its
    BOS is the tokenizer's (or, as GPT-2 has it, that same end-of-text token when the tokenizer has none)."""
    model_cfg.eos_token_id = tokenizer.eod
    model_cfg.bos_token_id = tokenizer.eod if tokenizer.bos is None else tokenizer.bos


def run(args) -> int:
    from megajoy.data.pretrain import check_vocab, resolve_data

    from megajoy.launch import setup_parallel
    from megajoy.parallel.state import rank0_first

    job = build_job(args)
    pc = setup_parallel(job)
    with rank0_first(pc):
        blend, tokenizer = resolve_data(job)
    check_vocab(tokenizer, blend, job.model.vocab_size)
    take_special_token_ids(job.model, tokenizer)
    trainer = Trainer(job, PretrainStage(blend, tokenizer), tokenizer.path, pc)
    summary = trainer.run()
    if "val_loss" in summary and pc.rank == 0:
        print(f"megajoy pretrain: step {trainer.step}, validation loss {summary['val_loss']:.4f}; "
              f"checkpoints in {trainer.out}/checkpoints")
    return 0
