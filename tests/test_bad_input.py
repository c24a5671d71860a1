"""Bad input is refused clearly: one line naming the file/line/field (or the flag), exit code 2 for the stages
(the validate CLI: 1 = problems found, 2 = unreadable), before DeepSpeed starts or any model is loaded.

Most cases run in-process through exactly what a stage does first (`parse_config` -> `preflight` -> reading
its data rows), mapped to exit codes the way `run_main` maps them; a representative subset runs the real
command line as a subprocess and also checks that the error came before DeepSpeed's start-up line.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from step1_sft.config import SFTConfig
from step2_reward_model.config import RewardConfig
from step3_rlhf.config import RLHFConfig
from utils.data import validate as validate_cli
from utils.data.pipeline import field_char_cap
from utils.data.splits import load_stage_rows
from utils.models import load_tokenizer
from utils.options import parse_config
from utils.stage import preflight, user_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {1: SFTConfig, 2: RewardConfig, 3: RLHFConfig}
GOOD = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.", "rejected": "No idea."}
        for i in range(1, 4)]  # lines 1-3 of every bad file; the defect is on line 4

# name -> the bytes of line 4, and the message expected for it ("FILE" = the file's path)
BAD_ROWS = {
    "bad_json": (b'{"prompt": "hi", "chosen": "a", "rejected": "b"', "FILE:4: field '(row)': invalid JSON"),
    "missing_chosen": (b'{"prompt": "hi", "rejected": "b"}', "FILE:4: field 'chosen': missing"),
    "chosen_not_string": (b'{"prompt": "hi", "chosen": 5, "rejected": "b"}',
                          "FILE:4: field 'chosen': expected a string, got int"),
    "empty_chosen": (b'{"prompt": "hi", "chosen": "  ", "rejected": "b"}', "FILE:4: field 'chosen': empty reply"),
    "empty_rejected": (b'{"prompt": "hi", "chosen": "a", "rejected": ""}', "FILE:4: field 'rejected': empty reply"),
    "same_reply": (b'{"prompt": "hi", "chosen": "x", "rejected": "x"}',
                   "FILE:4: field 'rejected': identical to chosen"),
    "duplicate": (json.dumps(GOOD[0]).encode(), "FILE:4: field '(row)': exact duplicate of FILE:1"),
    "not_object": (b'[1, 2]', "FILE:4: field '(row)': expected a JSON object, got list"),
    "unknown_role": (b'{"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}',
                     "FILE:4: field 'prompt[0].role': unknown role 'wizard'"),
    "ends_with_assistant": (b'{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]'
                            b', "chosen": "a", "rejected": "b"}',
                            "FILE:4: field 'prompt': must end with a user turn"),
    "no_prompt": (b'{"question": "hi"}', "FILE:4: field 'prompt': missing"),
    "empty_prompt": (b'{"prompt": "", "chosen": "a", "rejected": "b"}',
                     "FILE:4: field 'prompt': the last user turn is empty"),
    "not_utf8": (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',
                 "FILE:4: field 'prompt': not valid UTF-8 text"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Every malformed input of this file, built once."""
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("bad_input")
    out = {"dir": str(d), "model": tiny_model_dir}
    good = b"\n".join(json.dumps(r).encode() for r in GOOD) + b"\n"
    for name, (line, _) in BAD_ROWS.items():
        (d / f"{name}.jsonl").write_bytes(good + line + b"\n")
        out[name] = str(d / f"{name}.jsonl")
    (d / "good.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": "no"}) + "\n"
                                          for w in ("one", "two", "three", "four", "five", "six")))
    out["good"] = str(d / "good.jsonl")
    (d / "long.jsonl").write_bytes(good + json.dumps({"prompt": "x" * 500, "chosen": "a", "rejected": "b"}).encode())
    out["long"] = str(d / "long.jsonl")
    (d / "one_object.json").write_text(json.dumps(GOOD[0], indent=2))
    out["one_object"] = str(d / "one_object.json")
    (d / "broken_list.json").write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},')
    out["broken_list"] = str(d / "broken_list.json")
    (d / "no_config").mkdir()
    (d / "no_config" / "model.safetensors").write_bytes(b"")
    out["no_config"] = str(d / "no_config")
    (d / "no_weights").mkdir()
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), d / "no_weights" / "config.json")
    out["no_weights"] = str(d / "no_weights")
    out["model_file"] = os.path.join(tiny_model_dir, "config.json")
    (d / "not_a_tokenizer").mkdir()
    (d / "not_a_tokenizer" / "README").write_text("nothing here")
    out["not_a_tokenizer"] = str(d / "not_a_tokenizer")
    for name, attrs in (("no_pad", ["pad_token"]), ("no_pad_no_eos", ["pad_token", "eos_token"])):
        shutil.copytree(tiny_model_dir, d / name)
        tok = AutoTokenizer.from_pretrained(str(d / name))
        for a in attrs:
            setattr(tok, a, None)
        tok.save_pretrained(str(d / name))
        out[name] = str(d / name)
    (d / "a_file").write_text("x")
    out["a_file"] = str(d / "a_file")
    (d / "ckpt_less").mkdir()
    out["ckpt_less"] = str(d / "ckpt_less")
    return out


def startup(stage, argv, capsys):
    """(exit code, message) of what `python stepN/main.py ARGV` does before any model: flags, preflight, then
    the data rows (read right after DeepSpeed starts), with run_main's mapping of errors to exit codes."""
    try:
        cfg = parse_config(CONFIGS[stage], argv)
        preflight(cfg)
        if cfg.uses_data_split():
            load_stage_rows(cfg.data_path, cfg.data_split, cfg.data_split_index, cfg.seed, cfg.eval_fraction,
                            cfg.on_bad_rows,
                            field_char_cap(cfg))
    except SystemExit as e:
        return e.code, capsys.readouterr().err.strip()
    except user_errors() as e:
        return 2, f"error: {e}"
    return 0, ""


def fill(argv, files):
    return [a.format(**files) for a in argv]


# ---------------------------------------------------------------- data rows: the validate CLI


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_validate_reports_file_line_field(name, files, capsys):
    code = validate_cli.main([files[name]])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert out[0].startswith(BAD_ROWS[name][1].replace("FILE", files[name]))
    assert out[-1].startswith("4 rows, 1 problems")  # the summary: 3 good rows + the bad one, one problem


@pytest.mark.parametrize("name,extra,code,message", [
    ("long", ["--max_chars", "100"], 1, "{long}:4: field 'prompt': too long: "),  # + "N characters (limit 100)"
    ("one_object", [], 1, "{one_object}:1: field '(file)': one JSON object"),
    ("broken_list", [], 1, "{broken_list}:1: field '(file)': invalid JSON list"),
    ("missing", [], 2, "{dir}/missing.jsonl: no such file or directory"),
])
def test_validate_whole_file_problems(name, extra, code, message, files, capsys):
    path = files.get(name, os.path.join(files["dir"], "missing.jsonl"))
    assert validate_cli.main([path] + extra) == code
    out = capsys.readouterr().out
    assert message.format(**files) in out
    assert "(limit 100)" in out if extra else True


# ---------------------------------------------------------------- data rows and paths: the stages


DATA = ["--model_name_or_path", "{model}", "--output_dir", "{dir}/out", "--data_split", "1,1,1"]


@pytest.mark.parametrize("name", ["bad_json", "not_utf8", "same_reply", "duplicate", "missing_chosen"])
def test_stage_on_bad_rows_error_stops_with_file_line_field(name, files, capsys):
    code, msg = startup(2, fill(DATA + ["--data_path", files[name], "--on_bad_rows", "error"], files), capsys)
    assert code == 2
    assert msg.startswith("error: " + BAD_ROWS[name][1].replace("FILE", files[name]))


def test_stage_on_bad_rows_skip_counts_and_goes_on(files):
    bad = [files[n] for n in ("bad_json", "not_utf8", "same_reply")]  # 3 good + 1 bad row each; good rows repeat
    train, evals, skipped = load_stage_rows(bad[:1], "1,1,1", 0, 1234, 0.0, "skip")
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad[0]}:4: field '(row)'")
    assert len(train) == 1  # 3 good rows split 1,1,1 -> one for step 1 (upstream's rounding)


@pytest.mark.parametrize("stage,argv,message", [
    (1, ["--data_path", "{dir}/nope.jsonl"], "error: --data_path '{dir}/nope.jsonl': no such file or directory"),
    (1, ["--data_path", "no_such_dataset_name"], "'no_such_dataset_name' is not a file, a directory, or a supported "
                                                 "dataset name"),
    (1, ["--data_path", "{good}", "--data_split", "2,x,4"], "expected comma-separated numbers like '2,4,4'"),
    (2, ["--data_path", "{good}", "--data_split", "10,0,0"], "error: --data_split 10,0,0 gives step2_reward_model "
                                                             "(share 2) no data"),
    (3, ["--actor_model_name_or_path", "{model}", "--critic_model_name_or_path", "{model}", "--data_path",
         "{good}", "--unsupervised_dataset_name", "{dir}/ptx.txt"],
     "error: --unsupervised_dataset_name '{dir}/ptx.txt': no such file or directory"),
])
def test_stage_data_paths(stage, argv, message, files, capsys):
    base = ["--output_dir", "{dir}/out"] + (["--model_name_or_path", "{model}"] if stage < 3 else [])
    code, msg = startup(stage, fill(base + argv, files), capsys)
    assert code == 2 and message.format(**files) in msg


def test_known_hub_dataset_offline_fails_fast(files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    code, msg = startup(1, fill(DATA + ["--data_path", "Dahoas/rm-static"], files), capsys)
    assert code == 2 and "cannot load Hub dataset 'Dahoas/rm-static': no network (offline)" in msg
    assert time.time() - t < 10  # no retries against a network that is not there


# ---------------------------------------------------------------- flags that contradict each other


S1 = ["--model_name_or_path", "{model}", "--data_path", "{good}", "--output_dir", "{dir}/out"]
S3 = ["--actor_model_name_or_path", "{model}", "--critic_model_name_or_path", "{model}", "--data_path", "{good}",
      "--output_dir", "{dir}/out"]
FLAG_CASES = [
    (1, S1 + ["--offload"], "--offload needs ZeRO stage 1, 2 or 3 (--zero_stage)"),
    (1, S1 + ["--only_optimize_lora"], "--only_optimize_lora needs --lora_dim > 0"),
    (1, S1 + ["--dtype", "fp16"], "--dtype fp16 needs a GPU"),
    (1, S1 + ["--resume", "--no_resume"], "--resume and --no_resume contradict each other"),
    (1, S1[:-1] + ["{ckpt_less}", "--resume"], "--resume given but {ckpt_less}/checkpoints holds no checkpoint"),
    (1, S1 + ["--zero_stage", "5"], "argument --zero_stage: invalid choice: 5"),
    (1, S1 + ["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    (1, S1 + ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
    (1, S1 + ["--learning_rate", "-0.1"], "--learning_rate must be >= 0, got -0.1"),
    (1, S1 + ["--max_steps", "5", "--num_warmup_steps", "10"], "--num_warmup_steps 10 is longer than --max_steps 5"),
    (3, S3 + ["--lr_scheduler_type", "constant", "--num_warmup_steps", "4"],
     "--num_warmup_steps 4 has no effect with --lr_scheduler_type constant: use constant_with_warmup"),
    (1, S1 + ["--eval_fraction", "1.5"], "--eval_fraction must be in [0, 1)"),
    (1, S1 + ["--save_total_limit", "0"], "--save_total_limit must be >= 1"),
    (1, S1 + ["--max_bad_steps", "0"], "--max_bad_steps must be >= 1"),
    (1, S1 + ["--on_bad_rows", "ignore"], "argument --on_bad_rows: invalid choice: 'ignore'"),
    (1, S1[:-1] + ["{a_file}"], "--output_dir '{a_file}' is a file"),
    (1, S1[:-1] + ["{model}"], "--output_dir is --model_name_or_path"),
    (2, S1 + ["--forward_chunk", "-1"], "--forward_chunk must be >= 0"),
    (3, S3 + ["--offload_reference_model"], "--offload_reference_model needs --actor_zero_stage 3"),
    (3, S3 + ["--offload_reward_model", "--critic_zero_stage", "2"],
     "--offload_reward_model needs --critic_zero_stage 3"),
    (3, S3 + ["--inference_tp_size", "2"], "--inference_tp_size > 1 needs --enable_hybrid_engine and "
                                           "--actor_zero_stage 3"),
    (3, S3 + ["--actor_zero_stage", "2", "--critic_zero_stage", "2", "--enable_hybrid_engine", "--offload"],
     "ZeRO-2 actor and critic + --enable_hybrid_engine + --offload without actor LoRA is unsupported"),
    (3, S3 + ["--offload", "--actor_zero_stage", "2"], "--offload needs ZeRO stage 1, 2 or 3 "
                                                      "(--actor_zero_stage/--critic_zero_stage)"),
    (3, S3 + ["--algo", "grpo", "--reward", "length"], "--algo grpo compares samples of one prompt: set "
                                                       "--num_generations >= 2"),
    (3, S3 + ["--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "3"],
     "--per_device_training_batch_size 3 must divide the 4 sequences"),
    (3, S3 + ["--reward", "no_such_rule"], "--reward: reward spec 'no_such_rule': unknown reward 'no_such_rule'"),
    (3, S3 + ["--only_optimize_lora"], "--only_optimize_lora needs --actor_lora_dim > 0"),
    (3, S3[2:], "--actor_model_name_or_path is required"),
    (3, S3 + ["--min_answer_seq_len", "300", "--max_answer_seq_len", "10"], "--min_answer_seq_len is larger than"),
]


@pytest.mark.parametrize("stage,argv,message", FLAG_CASES, ids=[f"s{c[0]}-{c[2][:40]}" for c in FLAG_CASES])
def test_flags_refused_with_one_line(stage, argv, message, files, capsys):
    code, msg = startup(stage, fill(argv, files), capsys)
    assert code == 2
    assert message.format(**files) in msg
    assert len(msg.splitlines()) == 1 and msg.startswith("error: ")


# ---------------------------------------------------------------- models and tokenizers


@pytest.mark.parametrize("stage,flag,value,message", [
    (1, "--model_name_or_path", "{dir}/no/such/model", "--model_name_or_path '{dir}/no/such/model': no such dir"),
    (1, "--model_name_or_path", "{no_config}", "no config.json"),
    (2, "--model_name_or_path", "{no_weights}", "has a config.json but no weights"),
    (1, "--model_name_or_path", "{model_file}", "is a file; pass the directory that holds config.json"),
    (1, "--tokenizer_name_or_path", "{not_a_tokenizer}", "no tokenizer files"),
    (3, "--critic_model_name_or_path", "./missing_critic", "--critic_model_name_or_path './missing_critic': no such"),
    (3, "--reward", "model:/no/such/rm", "--reward '/no/such/rm': no such directory"),
])
def test_model_paths_refused_before_loading(stage, flag, value, message, files, capsys):
    base = S1 if stage < 3 else S3
    code, msg = startup(stage, fill(base + [flag, value], files), capsys)
    assert code == 2 and message.format(**files) in msg


def test_hub_model_offline_and_not_cached(files, capsys, monkeypatch):
    import utils.stage
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(utils.stage, "go_offline", lambda: None)  # keep the HF libraries' globals untouched
    code, msg = startup(1, fill(S1[2:] + ["--model_name_or_path", "some-org/some-model"], files), capsys)
    assert code == 2 and "'some-org/some-model': not a local directory, not in the Hugging Face cache" in msg


def test_tokenizer_without_pad_uses_eos_and_without_eos_is_refused(files):
    tok = load_tokenizer(files["no_pad"])  # masks come from lengths, so pad = eos is safe (documented fallback)
    assert tok.pad_token == tok.eos_token == "</s>"
    with pytest.raises(user_errors(), match="has no eos_token; responses could never end"):
        load_tokenizer(files["no_pad_no_eos"])


# ---------------------------------------------------------------- the real command lines


def run_cli(args):
    t = time.time()
    r = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr, time.time() - t


@pytest.mark.parametrize("args,message", [
    (["step1_sft/main.py", "--model_name_or_path", "{dir}/no_model_here"], "no such directory"),
    (["step1_sft/main.py", "--model_name_or_path", "{model}", "--offload"], "--offload needs ZeRO stage"),
    (["step2_reward_model/main.py", "--model_name_or_path", "{no_weights}"], "no weights"),
    (["step3_rlhf/main.py", "--actor_model_name_or_path", "{model}", "--critic_model_name_or_path", "{model}",
      "--reward", "no_such_rule"], "unknown reward 'no_such_rule'"),
])
def test_cli_refuses_before_deepspeed_starts(args, message, files):
    code, out, seconds = run_cli(fill(args + ["--data_path", "{good}", "--output_dir", "{dir}/cli_out"], files))
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message.format(**files) in errors[0]
    assert "process(es) on" not in out  # start_stage's first line, printed once DeepSpeed is up: never reached
    assert seconds < 30  # seconds in practice (imports only); loose for a loaded 2-core machine


def test_cli_bad_row_refused_before_any_model_load(files):
    code, out, _ = run_cli(fill(["step1_sft/main.py", "--model_name_or_path", "{model}", "--data_path",
                                 "{not_utf8}", "--on_bad_rows", "error", "--output_dir", "{dir}/cli_out2",
                                 "--dtype", "fp32"], files))
    assert code == 2
    assert f"error: {files['not_utf8']}:4: field 'prompt': not valid UTF-8 text" in out
    assert "Loading weights" not in out


def test_validate_cli_subprocess(files):
    code, out, _ = run_cli(["-m", "utils.data.validate", files["same_reply"], files["duplicate"]])
    assert code == 1
    assert f"{files['same_reply']}:4: field 'rejected': identical to chosen" in out
    # duplicates are found across files too: every row of the second file repeats one of the first
    assert f"{files['duplicate']}:1: field '(row)': exact duplicate of {files['same_reply']}:1" in out
    assert "8 rows, 5 problems" in out  # same_reply:4 + duplicate:1-4
