"""Quiet console: the expected value-head LOAD REPORT and DeepSpeed's memory dumps are muted; a load report
about anything else stays visible."""
import logging

from utils.logger import expected_head_report, quiet_libraries

HEAD_ONLY = """LlamaForSequenceClassification LOAD REPORT from: /tmp/x
Key          | Status  |
-------------+---------+-
score.weight | MISSING |

Notes:
- MISSING:	those params were newly initialized because missing from the checkpoint."""


def test_expected_head_report_only():
    assert expected_head_report(HEAD_ONLY)
    assert not expected_head_report(HEAD_ONLY.replace("score.weight", "model.layers.0.mlp.up_proj.weight"))
    assert not expected_head_report(HEAD_ONLY.replace("MISSING |", "UNEXPECTED |"))
    assert not expected_head_report("some other warning")
    # a step-1 checkpoint that saved its LM head: unused by the value model, as expected (the step-2 demo's report)
    with_lm_head = HEAD_ONLY.replace("score.weight | MISSING |", "lm_head.weight | UNEXPECTED |\nscore.weight | MISSING |")
    assert expected_head_report(with_lm_head)
    assert not expected_head_report(with_lm_head.replace("lm_head.weight", "model.norm.weight"))


def test_value_model_load_is_quiet(tiny_model_dir, capfd):
    from utils.models import load_value_model
    quiet_libraries()
    load_value_model(tiny_model_dir)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Loading weights" not in err


def test_deepspeed_memory_dump_muted(capfd):
    quiet_libraries()
    import deepspeed.runtime.bf16_optimizer as bf16
    bf16.see_memory_usage("begin bf16_optimizer", force=True)
    assert "begin bf16_optimizer" not in capfd.readouterr().out


def test_other_transformers_warnings_stay():
    quiet_libraries()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addHandler(handler)
    try:
        hf_logger.warning("something the user must fix")
        hf_logger.warning(HEAD_ONLY)
    finally:
        hf_logger.removeHandler(handler)
    assert seen == ["something the user must fix"]


def test_cache_kwargs_use_the_current_transformers_name(tiny_model_dir):
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from utils.hf_compat import cache_kwargs
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name would raise here on transformers 5.x
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **cache_kwargs(model, cache))
        model(input_ids=torch.tensor([[8]]), use_cache=True, **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 4  # the cache passed under that name is the one the model filled
