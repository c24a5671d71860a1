"""Tiny tokenizer and models for tests (and for anyone who wants a seconds-long smoke run)."""
import string

from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(out_dir, chat_template=True):
    """Byte-level-free char+word vocabulary: every printable ASCII char is a token, plus common words."""
    words = ("the a an is of to and what how why you I it yes no please thanks answer question "
             "Human Assistant user assistant system good bad great terrible help sorry").split()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100,
                                     continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model_dir(out_dir, arch="llama", hidden=32, layers=2, seed=0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    tok = build_tiny_tokenizer(out_dir, chat_template=(arch == "llama"))
    n = len(tok)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          tie_word_embeddings=True)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=n, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, word_embed_proj_dim=hidden, max_position_embeddings=512,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, dropout=0.0, attention_dropout=0.0)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir)
    return out_dir


# Under our stage-3 settings (3e7 live parameters, utils/ds_config.py) a tiny model stays gathered through a
# whole forward, so ZeRO-3's release, prefetch and re-gather never run in tests. A live-parameter cap below the
# model's size with no reuse window makes ZeRO-3 release each module's weights after its forward, as we expect at
# 7B (one 4096 x 11008 matrix is 45M parameters); with weights over the persistence threshold (hidden >= 96) every
# forward re-gathers them.
def release_zero3_weights(setattr_=setattr, max_live=0):
    """Make every ZeRO-3 engine built from here on release its weights after each use. `max_live`: how many
    parameters may be gathered at once; 0 fetches each weight only when its module runs, a little more than one
    weight matrix lets the prefetcher fetch the next one ahead. `setattr_`: pytest's monkeypatch.setattr in a
    test, so the change is undone after it."""
    import utils.engine

    def releasing(make_config):
        def config(**kw):
            out = make_config(**kw)
            if out["zero_optimization"]["stage"] == 3:
                out["zero_optimization"].update(stage3_max_live_parameters=max_live, stage3_max_reuse_distance=0)
            return out
        return config

    setattr_(utils.engine, "train_ds_config", releasing(utils.engine.train_ds_config))
    setattr_(utils.engine, "eval_ds_config", releasing(utils.engine.eval_ds_config))
