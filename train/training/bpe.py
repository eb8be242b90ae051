"""Deterministic byte-level BPE tokenizers learnt from a few captions: the demo's teacher CLIP's tokenizer and the
tests' tiny towers' (no tokenizer download anywhere).

`learn_bpe_merges` is the learner (most frequent adjacent pair first, ties broken by the pair's text, so the same
captions always give the same merges); `train_tokenizer` builds a `CLIPTokenizer` on it.
"""

import json
import tempfile
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

EOW = "</w>"  # CLIP's end-of-word suffix


def train_tokenizer(captions, vocab_size: int = 1024, max_length: int = 32):
    """A ``CLIPTokenizer`` (byte-level BPE, ``</w>`` word ends, lower-casing, ``<|startoftext|>`` /
    ``<|endoftext|>``) whose merges are learnt from ``captions`` only. Text in other languages still
    tokenises (into bytes and short pieces) but the model never saw those tokens, as with OpenAI's CLIP.

    The same captions always give the same tokenizer: `tokenizers`' trainer breaks ties between equally frequent
    pairs (and numbers word-end symbols) in hash-map order, which changes from run to run and with it the teacher,
    so its merges and ids are replaced by `learn_bpe_merges`' deterministic ones.
    """
    captions = list(captions)
    trained = CLIPTokenizer().train_new_from_iterator(captions, vocab_size=vocab_size)
    backend = trained.backend_tokenizer
    words = Counter(piece for caption in captions
                    for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption)))
    specials = [trained.bos_token, trained.eos_token]
    base = sorted(t for t in trained.get_vocab() if t not in specials and len(t) == 1)
    word_ends = sorted({word[-1] + EOW for word in words})
    merges = learn_bpe_merges(words, vocab_size - len(specials) - len(base) - len(word_ends))
    vocab = {}
    for token in [*specials, *base, *word_ends, *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        trained.save_pretrained(folder)
        path = Path(folder) / "tokenizer.json"
        spec = json.loads(path.read_text())
        spec["model"]["vocab"], spec["model"]["merges"] = vocab, [list(m) for m in merges]
        path.write_text(json.dumps(spec))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = max_length
    return tokenizer


def learn_bpe_merges(words: Counter, max_merges: int, end_of_word: str = EOW) -> list[tuple[str, str]]:
    """BPE merges of a word-frequency table (words already byte-level mapped, as CLIP's pre-tokenizer gives them),
    deterministically: each step merges the most frequent adjacent pair, ties broken by the pair's text; the last
    symbol of a word carries ``end_of_word`` (CLIP's ``</w>``; ``""`` for GPT-2-style BPE, whose words carry their
    leading space instead). Stops after ``max_merges`` or when every word is one symbol."""
    spelled = {word: [*word[:-1], word[-1] + end_of_word] for word in words}
    merges = []
    while len(merges) < max_merges:
        pairs = Counter()
        for word, symbols in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in spelled.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[word] = merged
    return merges


__all__ = ["EOW", "learn_bpe_merges", "train_tokenizer"]
