"""Shared fixtures: a tiny random Qwen2 model with a tokenizer trained here (no downloads, no weights)."""
import pytest

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_TEXT = ["다음 중 전자금융거래법 제2조 정의로 옳은 것은? 1 2 3 4 5 정답: 설명하세요 개인정보 보호법",
              "system user assistant 금융보안 전문가 객관식 문제 번호 답하세요 핵심 용어 한국어 간결하게"] * 20


def build_tiny_model(path, vocab_size=300, seed=0, **config):
    """Save a 2-layer random Qwen2 model and a ChatML byte-level BPE tokenizer into path; return path. config
    overrides the Qwen2Config settings."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML, model_max_length=512)
    torch.manual_seed(seed)
    settings = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2) | config
    config = Qwen2Config(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, **settings)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


TINY_LAWS = ["전자서명은 서명자의 신원을 나타내는 정보이다.", "개인정보처리자는 개인정보를 보호하여야 한다.",
             "전자금융거래의 안전성을 확보하여야 한다.", "금융회사는 보안 사고를 금융위원회에 보고한다."]


@pytest.fixture
def tiny_index(tiny_model_dir, tmp_path, monkeypatch):
    """A four-article index built with the tiny model, installed as common.INDEX."""
    import json

    import torch

    import common
    import lm

    import retrieval as ix
    model = lm.load_model(str(tiny_model_dir), "cpu", torch.float32)
    tokenizer = lm.load_tokenizer(str(tiny_model_dir))
    chunks = [ix.Chunk(id=i, source=f"laws/t{i}.md", law="테스트법", kind="법률", article=f"제{i + 1}조", title="",
                       part=1, parts=1, text=t) for i, t in enumerate(TINY_LAWS)]
    vectors = ix.embed(model, tokenizer, TINY_LAWS)[ix.DENSE_VARIANT]
    folder = tmp_path / "02_index"
    folder.mkdir()
    ix.write_index(folder, chunks, ix.morphemes(ix.make_kiwi(), TINY_LAWS), vectors)
    meta = dict(settings=dict(BM25_BACKEND="rank_bm25"), corpus="toy", dense_variant=ix.DENSE_VARIANT,
                encoder=str(tiny_model_dir))
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (folder / "DONE").touch()
    monkeypatch.setattr(common, "INDEX", folder)
    return folder
