import socket

import pytest

from nanocap.tokenizer import EOT_ID, R50K_SHA256, find_bpe_file, get_tokenizer, Tokenizer


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the tokenizer touched the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_offline_bpe_file_is_found(no_network):
    import hashlib
    path = find_bpe_file()
    assert path is not None, "gpt2.tiktoken not installed: run `make install`"
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == R50K_SHA256


def test_known_ids(no_network):
    tok = Tokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.eos_id == EOT_ID == 50256
    assert tok.vocab_size == 50257


def test_unicode_round_trip(no_network):
    tok = get_tokenizer()
    for s in ["héllo wörld", "日本語のキャプション", "a 🐱 on a mat!", "  spaces\tand\nlines ", "!"]:
        assert tok.decode(tok.encode(s)) == s


def test_decode_stops_at_eos():
    tok = get_tokenizer()
    ids = tok.encode("a red circle") + [EOT_ID] + tok.encode(" garbage")
    assert tok.decode(ids) == "a red circle"


def test_special_token_text_is_plain_text():
    tok = get_tokenizer()
    assert EOT_ID not in tok.encode("<|endoftext|>")


def test_env_override_and_bad_file(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setenv("NANOCAP_GPT2_BPE", str(bad))
    with pytest.raises(RuntimeError, match="not the GPT-2 r50k_base file"):
        Tokenizer()
    monkeypatch.setenv("NANOCAP_GPT2_BPE", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        Tokenizer()


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError):
        get_tokenizer("bert")


def test_reduced_vocab_renumbers_and_round_trips():
    texts = ["a red circle", "two small squares above a star"]
    vocab = __import__("nanocap.tokenizer", fromlist=["build_vocab"]).build_vocab(texts)
    assert vocab == sorted(vocab) and EOT_ID in vocab
    tok = get_tokenizer("gpt2", vocab)
    assert tok.vocab_size == len(vocab) and tok.eos_id == vocab.index(EOT_ID)
    for t in texts:
        ids = tok.encode(t)
        assert max(ids) < len(vocab)
        assert tok.decode(ids + [tok.eos_id, 0]) == t
    assert [tok.vocab[i] for i in tok.encode("a red circle")] == get_tokenizer().encode("a red circle")
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        tok.encode("a purple hexagon")
    assert get_tokenizer(**tok.describe()).vocab == vocab
