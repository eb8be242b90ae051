"""The deterministic BPE learner behind the demo teacher's and the tests' tokenizers (training/bpe.py)."""

from collections import Counter

from proclip_train.demo.languages import COLOURS, SHAPES, SIZES
from proclip_train.training.bpe import learn_bpe_merges, train_tokenizer


def test_bpe_merges_by_hand():
    # "ab" x 5 is spelled [a, b</w>], "abc" x 2 [a, b, c</w>]: (a, b</w>) 5 wins; then (a, b) and (b, c</w>) tie at 2
    # and the pair's text decides; then (ab, c</w>)
    assert learn_bpe_merges(Counter({"ab": 5, "abc": 2}), 10) == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>")]
    assert learn_bpe_merges(Counter({"ab": 5, "abc": 2}), 1) == [("a", "b</w>")]


def test_tokenizer_training_is_deterministic():
    """`tokenizers`' trainer numbers symbols and breaks ties in hash-map order; two trainings must still agree, or a
    rerun of the demo would train another teacher."""
    captions = [f"A {size} {colour} {shape} left of a {colour} ring." for size in SIZES for colour in COLOURS
                for shape in SHAPES]
    first, second = train_tokenizer(captions, 1024, 32), train_tokenizer(captions, 1024, 32)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.tokenize(captions[0]) == [w + "</w>" for w in captions[0].lower().rstrip(".").split()] + [".</w>"]
