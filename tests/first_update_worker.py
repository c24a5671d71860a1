"""One PPO update from a fixed global batch of experience, for tests/test_distributed.py: run by the `deepspeed`
launcher with 1 or 2 processes and step 3's own options. Every rank makes the experience of the same 4 prompts
(greedy, so identical), keeps its share of the rows (rank r of W: rows r*4/W ...), and runs the stage's own
update on it. Rank 0 writes OUT.pt: the policy loss averaged over ranks and the change of every actor weight
(ZeRO-gathered). Data parallelism must not change either: same global batch, same update."""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from step3_rlhf.config import RLHFConfig  # noqa: E402
from step3_rlhf.engines import build_engines  # noqa: E402
from step3_rlhf.prompt_data import collate_prompts  # noqa: E402
from step3_rlhf.experience_maker import ExperienceMaker  # noqa: E402
from step3_rlhf.trainer import RLTrainer  # noqa: E402
from utils.models import gathered_state_dict, load_tokenizer  # noqa: E402
from utils.options import parse_config  # noqa: E402
from utils.stage import run_main, start_stage  # noqa: E402

PROMPTS = ["what is 2 and 2", "a", "how are you doing today, tell me please about the weather " * 2, "why no"]


def actor_weights(engine):
    state = gathered_state_dict(engine)  # a collective at ZeRO-3: every rank calls it
    return {k: v.detach().double().cpu().clone() for k, v in state.items()}


def main(argv):
    cfg = parse_config(RLHFConfig, argv)
    ctx = start_stage(cfg)
    tok = load_tokenizer(cfg.actor_model_name_or_path)
    engines = build_engines(cfg, ctx, 1, ctx.log, 1)
    maker = ExperienceMaker(cfg, engines, tok, ctx, functools.partial(collate_prompts, pad_id=tok.pad_token_id))
    trainer = RLTrainer(cfg, engines, ctx)
    items = [{"prompt_input_ids": tok(p)["input_ids"], "prompt": p, "meta": {}} for p in PROMPTS]
    torch.manual_seed(0)
    exp = maker.make(items, sample=False)  # greedy: the same rows on every rank
    share = len(PROMPTS) // ctx.world_size
    mine = exp.rows(slice(ctx.rank * share, (ctx.rank + 1) * share))
    before = actor_weights(engines.actor)
    stats = trainer.train_on([mine], 1)
    after = actor_weights(engines.actor)
    loss = torch.tensor(stats["loss/policy"], dtype=torch.float64)
    dist.all_reduce(loss)
    if ctx.rank == 0:
        torch.save({"loss": loss.item() / ctx.world_size, "tokens": exp.sequences.tolist(),
                    "delta": {k: after[k] - before[k] for k in after}}, os.environ["FIRST_UPDATE_OUT"])


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
