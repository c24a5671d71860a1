"""The hostile-input corpus (issue 19 point 4); the table of it is docs/hostile_input.md."""
import errno
import hashlib
import json
import os
import shutil

import pytest

# Each case: the exit code a user sees, ONE line naming the file/row/field (or the flag), no traceback, and the
# earlier output dir (a model + a checkpoint) left byte for byte as it was. Cases run in-process through what a
# stage does first (tests/test_bad_input.startup: flags -> preflight -> data rows) or the validate CLI's main;
# the table in docs/hostile_input.md lists them. Exit codes: stages 2 = refused, 0 = accepted (with a notice);
# validate 1 = problems, 2 = unreadable.
import tests.test_bad_input as bad  # noqa: E402 - its harness (not its tests: only the module is bound here)

files = bad.files  # its fixture of malformed inputs and models, shared

G = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.", "rejected": "No idea."} for i in (1, 2, 3)]
GOOD_LINES = b"\n".join(json.dumps(r).encode() for r in G) + b"\n"
BIG = 5_000_000  # characters of the 5 MB row

HOSTILE_FILES = {  # name -> bytes
    "empty": b"",
    "blank": b"\n  \n\n",
    "empty_list": b"[]",
    "bom": b"\xef\xbb\xbf" + GOOD_LINES,
    "crlf": GOOD_LINES.replace(b"\n", b"\r\n"),
    "nul_byte": GOOD_LINES + b'{"prompt": "a\x00b", "chosen": "x", "rejected": "y"}\n',
    "truncated": GOOD_LINES + b'{"prompt": "What is 4 + 4?", "chosen": "4 + 4',
    "dup_keys": GOOD_LINES + b'{"prompt": "a", "prompt": "b", "chosen": "x", "rejected": "y"}\n',
    "number_prompt": GOOD_LINES + b'{"prompt": 42, "chosen": "x", "rejected": "y"}\n',
    "nested_prompt": GOOD_LINES + b'{"prompt": {"text": "hi"}, "chosen": "x", "rejected": "y"}\n',
    "nested_reply": GOOD_LINES + b'{"prompt": "hi", "chosen": {"text": "x"}, "rejected": "y"}\n',
    "null_reply": GOOD_LINES + b'{"prompt": "hi", "chosen": null, "rejected": "y"}\n',
    "list_reply": GOOD_LINES + b'{"prompt": "hi", "chosen": ["x"], "rejected": "y"}\n',
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
    "big_row": GOOD_LINES + json.dumps({"prompt": "hi", "chosen": "x" * BIG, "rejected": "y"}).encode() + b"\n",
    "all_bad": b'{"prompt": 1}\n{"chosen": "x"}\n{"prompt": "q", "chosen": "", "rejected": "y"}\n',
    "sft_only": b"".join(json.dumps({"prompt": f"Say {w}.", "response": w}).encode() + b"\n"
                         for w in ("one", "two", "three", "four", "five", "six")),
    "mixed": GOOD_LINES + b'{"prompt": "Say hi.", "response": "hi"}\n',
    "fake_parquet": b"not parquet at all",
}


def _snapshot(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def hostile(files, tmp_path_factory):
    """bad.files plus the hostile files, and an earlier run's output dir (model + checkpoint) to keep intact."""
    d = tmp_path_factory.mktemp("hostile")
    out = dict(files)
    for name, body in HOSTILE_FILES.items():
        ext = ".parquet" if name == "fake_parquet" else (".json" if name == "empty_list" else ".jsonl")
        (d / (name + ext)).write_bytes(body)
        out[name] = str(d / (name + ext))
    (d / "no_train").mkdir()
    (d / "no_train" / "eval.jsonl").write_bytes(GOOD_LINES)
    out["no_train"] = str(d / "no_train")
    prev = d / "prev"
    (prev / "checkpoints" / "step2").mkdir(parents=True)
    (prev / "model.safetensors").write_bytes(b"earlier weights")
    (prev / "checkpoints" / "step2" / "trainer_state.json").write_text('{"step": 2}')
    (prev / "checkpoints" / "latest").write_text("step2")
    out["prev"] = str(prev)
    return out


S1 = ["--model_name_or_path", "{model}", "--output_dir", "{prev}", "--data_split", "1,1,1"]
S2 = S1[:-1] + ["0,1,0"]
S3 = ["--actor_model_name_or_path", "{model}", "--critic_model_name_or_path", "{model}", "--output_dir", "{prev}"]


def bad_row(cid, stage, name, problem):
    """A file whose line 4 is bad, read with --on_bad_rows error: exit 2, "error: FILE:4: field ...: problem"."""
    return (cid, stage, (S1 if stage == 1 else S2) + ["--data_path", "{%s}" % name, "--on_bad_rows", "error"], 2,
            "error: {%s}:4: %s" % (name, problem))


STAGE_CASES = [  # (id, stage, argv, exit code, the one line)
    ("empty-file", 1, S1 + ["--data_path", "{empty}"], 2, "error: {empty}: empty: no rows"),
    ("blank-lines-only", 1, S1 + ["--data_path", "{blank}"], 2, "error: {blank}: empty: no rows"),
    ("empty-json-list", 1, S1 + ["--data_path", "{empty_list}"], 2, "error: {empty_list}: empty: no rows"),
    ("bom", 1, S1[:-1] + ["1,0,0", "--data_path", "{bom}"], 0, ""),
    ("crlf", 1, S1[:-1] + ["1,0,0", "--data_path", "{crlf}"], 0, ""),
    bad_row("nul-byte", 1, "nul_byte", "field '(row)': invalid JSON: Invalid control character"),
    bad_row("invalid-utf8", 1, "not_utf8", "field 'prompt': not valid UTF-8 text"),
    bad_row("truncated-last-line", 1, "truncated", "field '(row)': invalid JSON: Unterminated string"),
    bad_row("duplicate-keys", 1, "dup_keys", "field 'prompt': given twice in one row object"),
    bad_row("number-as-prompt", 1, "number_prompt", "field 'prompt': expected a string, got int"),
    bad_row("object-as-prompt", 1, "nested_prompt", "field 'prompt': expected a string, got dict"),
    bad_row("object-as-reply", 2, "nested_reply", "field 'chosen': expected a string, got dict"),
    bad_row("list-as-reply", 2, "list_reply", "field 'chosen': expected a string, got list"),
    bad_row("null-reply", 2, "null_reply", "field 'chosen': null (expected a string)"),
    ("binary-file", 1, S1 + ["--data_path", "{binary}"], 2, "error: {binary}: all 3 rows are bad"),
    bad_row("5mb-row-error-mode", 2, "big_row", "field 'chosen': too long: 5000000 characters, over the cap of 10240"),
    ("every-row-bad", 1, S1 + ["--data_path", "{all_bad}"], 2,
     "error: {all_bad}: all 3 rows are bad (--on_bad_rows skip dropped them); first: {all_bad}:1: field 'prompt'"),
    ("blend-sft-file-for-step2", 2, S2 + ["--data_path", "{good}", "{sft_only}"], 2,
     "error: {sft_only}: all 5 rows are unusable for stage 2 (reward)"),
    ("mixed-row-error-mode", 2, S2 + ["--data_path", "{mixed}", "--on_bad_rows", "error", "--eval_fraction", "0"], 2,
     "error: {mixed}:4: field 'rejected': missing: step 2 (reward model)"),
    ("sft-file-for-step1", 1, S1 + ["--data_path", "{sft_only}", "--data_split", "1,0,0"], 0, ""),
    ("prompts-for-step3", 3, S3 + ["--data_path", "{sft_only}", "--data_split", "0,0,1"], 0, ""),
    ("fake-parquet", 1, S1 + ["--data_path", "{fake_parquet}"], 2, "error: {fake_parquet}: cannot read parquet"),
    ("dir-without-train-file", 1, S1 + ["--data_path", "{no_train}"], 2, "error: {no_train}: no training file"),
    ("batch-0", 1, S1 + ["--data_path", "{good}", "--per_device_train_batch_size", "0"], 2,
     "error: --per_device_train_batch_size must be >= 1, got 0"),
    ("negative-lr", 1, S1 + ["--data_path", "{good}", "--learning_rate=-1e-5"], 2,
     "error: --learning_rate must be >= 0, got -1e-05"),
    ("nan-lr", 1, S1 + ["--data_path", "{good}", "--learning_rate", "nan"], 2,
     "error: --learning_rate must be >= 0, got nan"),
    ("nan-actor-lr", 3, S3 + ["--data_path", "{good}", "--actor_learning_rate", "nan"], 2,
     "error: --actor_learning_rate must be >= 0, got nan"),
    ("data-split-zero-share", 2, S1[:-1] + ["10,0,0", "--data_path", "{good}"], 2,
     "error: --data_split 10,0,0 gives step2_reward_model (share 2) no data"),
    ("data-split-all-zero", 1, S1[:-1] + ["0,0,0", "--data_path", "{good}"], 2, "shares must be >= 0 and not all 0"),
    ("data-split-empty-slice", 1, S1[:-1] + ["1,1000,1000", "--data_path", "{good}", "--eval_fraction", "0"], 2,
     "error: no training rows for stage 1 from {good}: --data_split '1,1000,1000' leaves this stage an empty slice"),
    ("max-seq-len-0", 1, S1 + ["--data_path", "{good}", "--max_seq_len", "0"], 2, "error: --max_seq_len must be >= 1"),
    ("max-prompt-len-0", 3, S3 + ["--data_path", "{good}", "--max_prompt_seq_len", "0"], 2,
     "error: --max_prompt_seq_len must be >= 1"),
    ("max-field-chars-negative", 1, S1 + ["--data_path", "{good}", "--max_field_chars", "-1"], 2,
     "error: --max_field_chars must be >= 0"),
    ("unknown-data-name", 1, S1 + ["--data_path", "no_such_dataset"], 2,
     "'no_such_dataset' is not a file, a directory, or a supported dataset name"),
    ("missing-config", 1, S1[2:] + ["--model_name_or_path", "{no_config}", "--data_path", "{good}"], 2,
     "error: --model_name_or_path '{no_config}': no config.json"),
    ("no-weights", 2, S2[2:] + ["--model_name_or_path", "{no_weights}", "--data_path", "{good}"], 2,
     "has a config.json but no weights"),
    ("resume-without-checkpoint", 1, ["--model_name_or_path", "{model}", "--output_dir", "{ckpt_less}",
                                      "--data_path", "{good}", "--resume"], 2, "--resume given but"),
]


@pytest.mark.parametrize("case", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_hostile_stage_input(case, hostile, capsys):
    _, stage, argv, code, line = case
    before = _snapshot(hostile["prev"])
    got, msg = bad.startup(stage, bad.fill(argv, hostile), capsys)
    assert got == code, msg
    assert "Traceback" not in msg and len(msg.splitlines()) <= 1
    assert line.format(**hostile) in msg
    assert _snapshot(hostile["prev"]) == before  # nothing of the earlier run deleted or overwritten


VALIDATE_CASES = [  # (id, argv, exit code, a line of the output)
    ("validate-empty", ["{empty}"], 1, "{empty}: empty: no rows"),
    ("validate-5mb-row", ["{big_row}"], 1, "{big_row}:4: field 'chosen': too long: 5000000 characters, over the cap"),
    ("validate-stage2-sft-rows", ["{sft_only}", "--stage", "2"], 1, "{sft_only}:1: field 'rejected': missing"),
    ("validate-stage1-sft-rows", ["{sft_only}", "--stage", "1"], 0, "6 rows, 0 problems"),
    ("validate-bom-crlf", ["{bom}", "{crlf}"], 1, "{crlf}:1: field '(row)': exact duplicate of {bom}:1"),
    ("validate-dup-keys", ["{dup_keys}"], 1, "{dup_keys}:4: field 'prompt': given twice in one row object"),
    ("validate-prompt-over-max-seq-len", ["{good}", "--tokenizer", "{model}", "--max_seq_len", "4"], 1,
     "{good}:1: field 'prompt': too long:"),
    ("validate-missing-file", ["{dir}/nope.jsonl"], 2, "{dir}/nope.jsonl: no such file or directory"),
]


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=[c[0] for c in VALIDATE_CASES])
def test_hostile_validate(case, hostile, capsys):
    from utils.data import validate as validate_cli
    _, argv, code, line = case
    assert validate_cli.main(bad.fill(argv, hostile)) == code
    out = capsys.readouterr()
    assert line.format(**hostile) in out.out.splitlines()[0] + "\n" + out.out.splitlines()[-1] or \
        line.format(**hostile) in out.out
    assert "Traceback" not in out.out + out.err


def test_accepted_files_read_clean_text(hostile):
    from utils.data.readers import read_rows
    for name in ("bom", "crlf"):
        rows = read_rows(hostile[name]).rows
        assert [r.chosen for r in rows] == [g["chosen"] for g in G]
        assert all("\r" not in r.chosen and "\ufeff" not in r.prompt[0]["content"] for r in rows)


def test_5mb_row_is_cut_before_tokenising_in_skip_mode(hostile):
    from utils.data.splits import load_stage_rows
    cut = []
    train, _, _ = load_stage_rows([hostile["big_row"]], "0,1,0", 1, 1234, 0.0, "skip", 10240, cut)
    assert max(len(r.chosen) for r in train) == 10240 and len(cut) == 1
    assert cut[0].startswith(f"{hostile['big_row']}:4: field 'chosen': 5000000 characters cut to 10240")


# ---------------------------------------------------------------- models and checkpoints


def _one_line_user_error(fn):
    from utils.stage import user_errors
    with pytest.raises(user_errors()) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_truncated_safetensors_one_line(hostile, tmp_path):
    from utils.models import load_causal_lm
    shutil.copytree(hostile["model"], tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    msg = _one_line_user_error(lambda: load_causal_lm(str(tmp_path / "m")))
    assert msg.startswith(f"cannot load '{tmp_path / 'm'}': a weights file is damaged or truncated")


def test_checkpoint_without_tokenizer_one_line(hostile, tmp_path):
    from utils.models import load_tokenizer
    (tmp_path / "m").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(hostile["model"], name), tmp_path / "m" / name)
    msg = _one_line_user_error(lambda: load_tokenizer(str(tmp_path / "m")))
    assert "no usable tokenizer" in msg and "--tokenizer_name_or_path" in msg


def test_unknown_model_name_offline_one_line(hostile, capsys, monkeypatch):
    import utils.stage
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(utils.stage, "go_offline", lambda: None)
    code, msg = bad.startup(1, bad.fill(S1[2:] + ["--model_name_or_path", "nobody/llama-9000", "--data_path",
                                                  "{good}"], hostile), capsys)
    assert code == 2 and "--model_name_or_path 'nobody/llama-9000': not a local directory" in msg


def test_causal_lm_given_as_reward_model_is_named(hostile, tmp_path):
    from step3_rlhf.config import RLHFConfig
    from utils.models import load_tokenizer
    from utils.options import parse_config
    from step3_rlhf.tokenizer_check import check_step3_tokenizers
    lines = []
    cfg = parse_config(RLHFConfig, ["--actor_model_name_or_path", hostile["model"], "--critic_model_name_or_path",
                                    hostile["model"], "--output_dir", str(tmp_path / "o")])
    assert check_step3_tokenizers(cfg, load_tokenizer(hostile["model"]),
                                  type("Log", (), {"info": staticmethod(lines.append)})) is None
    assert lines == [f"warning: the reward model {hostile['model']} is a causal LM (LlamaForCausalLM), not a step-2 "
                     "reward model: its score head starts random, so its scores mean nothing; pass a step-2 output "
                     "directory"]


def test_reward_tokenizer_that_does_not_exist(hostile, tmp_path):
    from step3_rlhf.config import RLHFConfig
    from utils.models import load_tokenizer
    from utils.options import parse_config
    from step3_rlhf.tokenizer_check import check_step3_tokenizers
    cfg = parse_config(RLHFConfig, ["--actor_model_name_or_path", hostile["model"], "--critic_model_name_or_path",
                                    hostile["model"], "--reward_tokenizer", str(tmp_path / "none"), "--output_dir",
                                    str(tmp_path / "o")])
    msg = _one_line_user_error(lambda: check_step3_tokenizers(cfg, load_tokenizer(hostile["model"]),
                                                              type("Log", (), {"info": staticmethod(print)})))
    assert str(tmp_path / "none") in msg


class _FakeEngine:
    """Writes what a DeepSpeed engine's save_checkpoint writes, in miniature; loads fail like a model mismatch."""

    def save_checkpoint(self, folder, tag, save_latest):
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        with open(os.path.join(folder, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
            fh.write(b"weights")

    def load_checkpoint(self, folder, **kw):
        raise RuntimeError("Error(s) in loading state_dict: size mismatch for model.embed_tokens.weight")


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch
    from utils.checkpoint import Checkpointer
    from utils.stage import user_errors
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save({"model": _FakeEngine()}, 1, {"epoch": 0})
    before = _snapshot(ckpt.root)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(user_errors()) as err:
        ckpt.save({"model": _FakeEngine()}, 2, {"epoch": 0})
    assert str(err.value).startswith(f"cannot save checkpoint step2 in {ckpt.root}: No space left on device; the "
                                     "previous checkpoint step1 is intact")
    assert _snapshot(ckpt.root) == before and ckpt.verify("step1") is None and ckpt.tags() == ["step1"]


def test_checkpoint_of_another_model_is_refused_not_deleted(tmp_path):
    from utils.checkpoint import Checkpointer
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save({"model": _FakeEngine()}, 1, {"epoch": 0})
    before = _snapshot(ckpt.root)
    msg = _one_line_user_error(lambda: ckpt.restore({"model": _FakeEngine()}))
    assert msg == f"no usable checkpoint in {ckpt.root} (broken: step1); pass --no_resume to start over"
    assert _snapshot(ckpt.root) == before


class _SizedEngine(_FakeEngine):
    def __init__(self, micro):
        self.micro = micro

    def train_micro_batch_size_per_gpu(self):
        return self.micro


def test_resume_with_a_changed_batch_size_is_refused(tmp_path):
    from utils.checkpoint import Checkpointer
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save({"model": _SizedEngine(8)}, 1, {"epoch": 0})
    before = _snapshot(ckpt.root)
    msg = _one_line_user_error(lambda: ckpt.restore({"model": _SizedEngine(4)}))
    assert msg == (f"{ckpt.root}/step1 was saved with a micro-batch of 8 per process ('model'), this run has 4: resume "
                   "with the same batch size flags, or pass --no_resume")
    assert _snapshot(ckpt.root) == before


def test_resume_with_a_changed_world_size_warns_in_one_line(tmp_path):
    import torch
    from utils.checkpoint import Checkpointer

    class Loads(_SizedEngine):
        def save_checkpoint(self, folder, tag, save_latest):
            os.makedirs(os.path.join(folder, tag), exist_ok=True)
            torch.save({"w": torch.zeros(2)}, os.path.join(folder, tag, "mp_rank_00_model_states.pt"))

        def load_checkpoint(self, folder, **kw):
            return folder, {}
    lines = []
    log = type("Log", (), {"info": staticmethod(lines.append)})
    ckpt = Checkpointer(str(tmp_path), rank=1, log=log)  # this run's rank 1; the checkpoint was written by one process
    shutil.rmtree(tmp_path, ignore_errors=True)
    Checkpointer(str(tmp_path)).save({"model": Loads(8)}, 1, {"epoch": 0})
    state = torch.get_rng_state()
    assert ckpt.restore({"model": Loads(8)})[0] == "step1"
    torch.set_rng_state(state)
    assert lines == [f"warning: {ckpt.root}/step1 was saved with 1 process(es); rank 1 takes rank 0's random state, so "
                   "sampling will not repeat the interrupted run exactly"]
