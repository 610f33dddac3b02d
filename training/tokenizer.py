"""The demo model's tokenizer: a SentencePiece-Unigram tokenizer.json in the UMT5 format.

Vocab: <pad>=0, </s>=1, <unk>=2, then one piece per grammar word ("▁red", "▁circle", ...), then
single-character fallback pieces ("▁", a-z, 0-9, punctuation) so any lowercase ASCII text tokenizes
without <unk>. Words score -2, characters -10 (Unigram picks the whole-word piece whenever it exists).

tokenizer.json pipeline (standard Hugging Face components, all read by src/io/tokenizer.ts):
  normalizer     Sequence[NFKC, Lowercase, Strip, Replace(/ {2,}/ -> " ")]
  pre_tokenizer  Metaspace(replacement "▁", prepend_scheme "always", split true)
  model          Unigram(unk_id 2, byte_fallback false), vocab [[piece, score], ...]
  post_processor TemplateProcessing("$A </s>")
  decoder        Metaspace

`encode()` below is a Python implementation of exactly that pipeline (Viterbi over piece scores,
consecutive unknown characters fused into one <unk>); verify_tokenizer.ts checks that the engine's
TypeScript tokenizer produces the same ids from the exported tokenizer.json.
"""
import json
import math
import os
import re
import unicodedata

from data import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES

SPECIALS = ['<pad>', '</s>', '<unk>']
PAD, EOS, UNK = 0, 1, 2
META = '\u2581'
WORD_SCORE, CHAR_SCORE = -2.0, -10.0
CHARS = 'abcdefghijklmnopqrstuvwxyz0123456789.,!?\'-:;()'


def grammar_words():
    words = ['a', 'moving', 'on', 'background']
    words += list(COLORS) + SHAPES + list(DIRECTIONS)
    for b in BACKGROUNDS:
        words += b.split()
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_vocab():
    vocab = [[s, 0.0] for s in SPECIALS]
    vocab += [[META + w, WORD_SCORE] for w in grammar_words()]
    vocab += [[META, CHAR_SCORE]] + [[c, CHAR_SCORE] for c in CHARS]
    return vocab


VOCAB = build_vocab()
PIECE_ID = {p: i for i, (p, _) in enumerate(VOCAB)}
MAX_PIECE = max(len(p) for p, _ in VOCAB)
UNK_SCORE = min(s for _, s in VOCAB) - 10.0
_WS = '\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000'


def normalize(text):
    t = unicodedata.normalize('NFKC', text).lower()
    t = re.sub(f'^[{_WS}]+|[{_WS}]+$', '', t)
    return re.sub(' {2,}', ' ', t)


def pre_tokenize(t):
    t = t.replace(' ', META)
    if t and not t.startswith(META):
        t = META + t
    words, start = [], 0
    i = t.find(META, 1)
    while i != -1:
        if i > start:
            words.append(t[start:i])
        start = i
        i = t.find(META, i + 1)
    if start < len(t):
        words.append(t[start:])
    return words


def _viterbi(w):
    n = len(w)
    best = [-math.inf] * (n + 1)
    frm = [-1] * (n + 1)
    ida = [-1] * (n + 1)
    best[0] = 0.0
    for s in range(n):
        single = False
        for e in range(s + 1, min(n, s + MAX_PIECE) + 1):
            pid = PIECE_ID.get(w[s:e])
            if pid is None:
                continue
            sc = best[s] + VOCAB[pid][1]
            if frm[e] == -1 or sc > best[e]:
                best[e], frm[e], ida[e] = sc, s, pid
            if e - s == 1:
                single = True
        if not single:
            sc = best[s] + UNK_SCORE
            if frm[s + 1] == -1 or sc > best[s + 1]:
                best[s + 1], frm[s + 1], ida[s + 1] = sc, s, UNK
    out, e, unk_run = [], n, False
    while e > 0:
        s = frm[e]
        if ida[e] == UNK:
            if not unk_run:
                out.append(UNK)
            unk_run = True
        else:
            out.append(ida[e])
            unk_run = False
        e = s
    return out[::-1]


def encode(text):
    """ids of `text` with </s> appended (no padding)."""
    ids = []
    for w in pre_tokenize(normalize(text)):
        ids += _viterbi(w)
    return ids + [EOS]


def encode_padded(text, text_len):
    ids = encode(text)
    if len(ids) > text_len:
        ids = ids[:text_len - 1] + [EOS]
    return ids + [PAD] * (text_len - len(ids)), len(ids)


def tokenizer_json():
    return {
        'version': '1.0',
        'truncation': None,
        'padding': None,
        'added_tokens': [
            {'id': i, 'content': s, 'single_word': False, 'lstrip': False, 'rstrip': False, 'normalized': False,
             'special': True} for i, s in enumerate(SPECIALS)
        ],
        'normalizer': {'type': 'Sequence', 'normalizers': [
            {'type': 'NFKC'},
            {'type': 'Lowercase'},
            {'type': 'Strip', 'strip_left': True, 'strip_right': True},
            {'type': 'Replace', 'pattern': {'Regex': ' {2,}'}, 'content': ' '},
        ]},
        'pre_tokenizer': {'type': 'Metaspace', 'replacement': META, 'prepend_scheme': 'always', 'split': True},
        'post_processor': {
            'type': 'TemplateProcessing',
            'single': [{'Sequence': {'id': 'A', 'type_id': 0}}, {'SpecialToken': {'id': '</s>', 'type_id': 0}}],
            'pair': [{'Sequence': {'id': 'A', 'type_id': 0}}, {'SpecialToken': {'id': '</s>', 'type_id': 0}},
                     {'Sequence': {'id': 'B', 'type_id': 0}}, {'SpecialToken': {'id': '</s>', 'type_id': 0}}],
            'special_tokens': {'</s>': {'id': '</s>', 'ids': [EOS], 'tokens': ['</s>']}},
        },
        'decoder': {'type': 'Metaspace', 'replacement': META, 'prepend_scheme': 'always', 'split': True},
        'model': {'type': 'Unigram', 'unk_id': UNK, 'vocab': VOCAB, 'byte_fallback': False},
    }


def write(dirpath, text_len):
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, 'tokenizer.json'), 'w', encoding='utf-8') as fh:
        json.dump(tokenizer_json(), fh, ensure_ascii=False, indent=1)
    with open(os.path.join(dirpath, 'tokenizer_config.json'), 'w') as fh:
        json.dump({
            'tokenizer_class': 'T5TokenizerFast',
            'model_max_length': text_len,
            'pad_token': '<pad>', 'eos_token': '</s>', 'unk_token': '<unk>',
            'extra_ids': 0, 'additional_special_tokens': [],
            'add_prefix_space': True, 'legacy': False, 'clean_up_tokenization_spaces': False,
            'padding_side': 'right',
        }, fh, indent=1)
    with open(os.path.join(dirpath, 'special_tokens_map.json'), 'w') as fh:
        json.dump({'pad_token': '<pad>', 'eos_token': '</s>', 'unk_token': '<unk>'}, fh, indent=1)


if __name__ == '__main__':
    for s in ['a red circle moving left on a dark blue background', '', 'A  Purple hexagon!', '色调艳丽']:
        print(repr(s), encode(s))
    print('vocab size', len(VOCAB))
