"""Actor and reward model of different tokenizer families (issue 19 point 2): detected at start, scored through
the reward model's own tokens; a critic of another family is refused."""
import pytest


def build_other_tokenizer(out_dir):
    """A tokenizer of another 'family': other special ids, characters in another order, other words, no chat
    template (so prompts are hh text) - the ids of the tiny Llama tokenizer mean other text to it."""
    import string
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(["<unk>", "</s>", "<s>", "<pad>"])}
    for ch in reversed(string.printable):
        vocab.setdefault(ch, len(vocab))
    for w in "Human Assistant what is the answer hello world".split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100,
                                     continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="module")
def other_family_rm(tmp_path_factory):
    """(directory, tokenizer, value model) of a tiny OPT reward model with the other tokenizer."""
    import torch
    from transformers import OPTConfig, OPTForSequenceClassification
    from utils.models import load_value_model
    d = str(tmp_path_factory.mktemp("other_rm"))
    tok = build_other_tokenizer(d)
    torch.manual_seed(3)
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=1)
    OPTForSequenceClassification(cfg).save_pretrained(d)
    return d, tok, load_value_model(d).eval()


def test_compare_detects_another_family(tiny_model_dir, other_family_rm):
    from utils.models import load_tokenizer
    from utils.tokenizer_bridge import compare
    actor = load_tokenizer(tiny_model_dir)
    assert compare(actor, load_tokenizer(tiny_model_dir)) is None
    assert compare(actor, other_family_rm[1]).startswith("vocabulary sizes differ")


def test_bridge_scores_equal_scoring_the_decoded_text_directly(tiny_model_dir, other_family_rm):
    import torch
    from step3_rlhf.experience import RewardFunction
    from utils.data.datasets import pad_sequences, tokenize_prompt, tokenize_response
    from utils.data.templates import format_prompt
    from utils.models import TokenValues, load_tokenizer, sequence_scores
    from utils.tokenizer_bridge import RewardBridge
    actor_tok = load_tokenizer(tiny_model_dir)
    _, rm_tok, rm = other_family_rm
    chats = [[{"role": "user", "content": "what is the answer"}],
             [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello world"}]]
    replies = ["yes 42", "hi there, friend"]
    prompts = [format_prompt(actor_tok, m) for m in chats]  # what step 3 hands the reward function
    seqs = [tokenize_prompt(actor_tok, m) + tokenize_response(actor_tok, r) for m, r in zip(chats, replies)]
    ids, mask = pad_sequences(seqs, actor_tok.pad_token_id, left=True)
    fn = RewardFunction(TokenValues(rm))
    fn.bridge = RewardBridge(actor_tok, rm_tok)
    bridged, _ = fn(ids, mask, prompts, replies, [{}, {}], row_chunk=1)
    # directly: the reward model's own tokens of the same chats, as step 2 built them (hh text, reply + EOS)
    direct_ids, direct_mask = pad_sequences([tokenize_prompt(rm_tok, m) + tokenize_response(rm_tok, r)
                                             for m, r in zip(chats, replies)], rm_tok.pad_token_id)
    assert torch.allclose(bridged, sequence_scores(rm, direct_ids, direct_mask), atol=1e-6)
    assert rm_tok.decode(direct_ids[0]).startswith("\n\nHuman: what is the answer\n\nAssistant: yes 42")
    with pytest.raises(IndexError):  # the actor's ids fed as they are: past the smaller vocabulary's embedding
        RewardFunction(TokenValues(rm))(ids, mask, prompts, replies, [{}, {}])


def test_prompt_messages_recovered_from_the_actor_template(tiny_model_dir):
    from utils.data.templates import format_prompt
    from utils.models import load_tokenizer
    from utils.tokenizer_bridge import prompt_messages_from_text
    tok = load_tokenizer(tiny_model_dir)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert prompt_messages_from_text(format_prompt(tok, chat), tok) == chat


def test_critic_of_another_family_refused_with_one_line(tiny_model_dir, other_family_rm, tmp_path):
    from step3_rlhf.config import RLHFConfig
    from utils.models import load_tokenizer
    from utils.options import ConfigError, parse_config
    from step3_rlhf.tokenizer_check import check_step3_tokenizers
    rm_dir = other_family_rm[0]
    cfg = parse_config(RLHFConfig, ["--actor_model_name_or_path", tiny_model_dir, "--critic_model_name_or_path",
                                    rm_dir, "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError) as err:
        check_step3_tokenizers(cfg, load_tokenizer(tiny_model_dir), None)
    assert rm_dir in str(err.value) and tiny_model_dir in str(err.value) and "\n" not in str(err.value)
    lines = []
    cfg = parse_config(RLHFConfig, ["--actor_model_name_or_path", tiny_model_dir, "--critic_model_name_or_path",
                                    tiny_model_dir, "--reward", f"model:{rm_dir}", "--output_dir", str(tmp_path / "o")])
    log = type("Log", (), {"info": staticmethod(lines.append)})
    bridge = check_step3_tokenizers(cfg, load_tokenizer(tiny_model_dir), log)
    assert bridge is not None and len(bridge.reward_tokenizer) == len(other_family_rm[1])
    assert lines[0].startswith(f"the reward model {rm_dir} uses another tokenizer than the actor")
