// UMT5 tokenizer (our Unigram implementation) and Wan's prompt encoding.
//
// Fixtures (test/fixtures/tokenizer, made by make_fixture.py there): two UMT5-format tokenizer.json
// files serialized by the Rust `tokenizers` library with the real SentencePiece nmt_nfkc charsmap and
// a small hand-written vocabulary ('legacy': the UMT5/T5 conversion pipeline; 'bytefallback': the
// newer pipeline with byte fallback, Strip, prepend_scheme 'first', no split), and reference.json
// with the ids the Rust library gives for fixed and random strings and for padded/truncated prompts.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { readFileSync, mkdtempSync, rmSync, cpSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadTokenizer, encodePrompt, cleanPrompt, htmlUnescape, UnigramTokenizer } from '../src/io/tokenizer.ts';
import { openModelFolder } from '../src/io/model-folder.ts';
import { CheckpointError } from '../src/util/errors.ts';
import { TINY } from './helpers/golden.ts';

const FIX = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'tokenizer');
const VARIANTS = ['legacy', 'bytefallback'] as const;

interface Ref {
  raw: Array<{ text: string; ids: number[]; tokens: string[] }>;
  fuzz: Array<{ text: string; ids: number[] }>;
  prompts: Array<{ text: string; clean: string; text_len: number; ids: number[]; mask: number[] }>;
}
const ref = (v: string): Ref => JSON.parse(readFileSync(join(FIX, v, 'reference.json'), 'utf8'));

const toks = new Map<string, UnigramTokenizer>();
beforeAll(async () => {
  for (const v of VARIANTS) toks.set(v, await loadTokenizer(join(FIX, v)));
});
const tok = (v: (typeof VARIANTS)[number] = 'legacy') => toks.get(v)!;

describe('tokenizer: parity with the Rust tokenizers library', () => {
  for (const v of VARIANTS) {
    it(`${v}: fixed strings (ids and pieces)`, () => {
      for (const r of ref(v).raw) {
        const e = tok(v).encode(r.text);
        expect({ text: r.text, ids: e.ids }).toEqual({ text: r.text, ids: r.ids });
        // pieces equal too, except fused unknowns, which keep their text
        expect(e.tokens.length).toBe(r.tokens.length);
      }
    });
    it(`${v}: 400 seeded random strings (charsmap, graphemes, spaces, unknowns, added tokens)`, () => {
      const bad = ref(v).fuzz.filter((r) => JSON.stringify(tok(v).encode(r.text).ids) !== JSON.stringify(r.ids));
      expect(bad.map((b) => b.text)).toEqual([]);
    });
    it(`${v}: Wan prompts, cleaned, truncated and padded to text_len 512/16/5/1`, () => {
      for (const r of ref(v).prompts) {
        expect(cleanPrompt(r.text)).toBe(r.clean);
        const e = encodePrompt(tok(v), r.text, r.text_len);
        expect({ text: r.text, len: r.text_len, ids: Array.from(e.ids), mask: Array.from(e.mask) }).toEqual({ text: r.text, len: r.text_len, ids: r.ids, mask: r.mask });
        expect(e.length).toBe(r.mask.reduce((a, b) => a + b, 0));
      }
    });
  }
});

describe('tokenizer: hand-derived encodings (legacy fixture)', () => {
  // vocabulary scores (see make_fixture.py): ▁=-2 ▁a=-3 ▁cat=-4 ▁c=-5 at=-3.5 ▁ca=-6 t=-4 s=-3
  // ▁cats=-9.5 ▁fi=-6 ne=-4 ▁fine=-7; ids: </s>=1 <unk>=2 ▁=3 ▁a=4 ▁cat=5 ▁c=6 at=7 s=10
  const ids = (text: string) => tok().encode(text).ids;
  it('Viterbi picks the best-scoring segmentation', () => {
    // ▁cat (-4) beats ▁c+at (-8.5) and ▁ca+t (-10)
    expect(ids('a cat')).toEqual([4, 5, 1]);
    // ▁cat+s (-7) beats ▁cats (-9.5)
    expect(ids('cats')).toEqual([5, 10, 1]);
    expect(tok().encode('cats').tokens).toEqual(['▁cat', 's', '</s>']);
    // ▁fine (-7) beats ▁fi+ne (-10); the ﬁ ligature is NFKC-normalized to "fi" by the charsmap
    expect(ids('fine')).toEqual([24, 1]);
    expect(ids('ﬁne')).toEqual([24, 1]);
  });
  it('unknown characters fuse into one <unk>, after a lone ▁', () => {
    expect(tok().encode('zzz').tokens).toEqual(['▁', 'zzz', '</s>']);
    expect(ids('zzz')).toEqual([3, 2, 1]);
    expect(ids('a 🐱 cat')).toEqual([4, 3, 2, 5, 1]);
  });
  it('byte fallback spells unknown characters as UTF-8 bytes', () => {
    const b = tok('bytefallback');
    expect(b.encode('a 🐱 cat').tokens).toEqual(['▁a', '▁', '<0xF0>', '<0x9F>', '<0x90>', '<0xB1>', '▁cat', '</s>']);
    expect(b.decode(b.encode('a 🐱 cat').ids)).toBe('a 🐱 cat');
  });
  it('unicode: composed and decomposed accents, full-width forms, CJK', () => {
    expect(ids('café')).toEqual(ids('cafe\u0301'));
    expect(ids('café')).toEqual([25, 1]);
    expect(ids('ｃａｔ')).toEqual(ids('cat'));
    expect(ids('ＡＢＣ')).toEqual([27, 28, 1]);
    expect(tok().encode('中文').tokens).toEqual(['▁中', '文', '</s>']);
  });
  it('special tokens in the text are kept whole; spaces become ▁ words', () => {
    expect(ids('a cat</s>')).toEqual([4, 5, 1, 1]);
    expect(tok().encode('a <extra_id_0> cat').tokens).toEqual(['▁a', '▁', '<extra_id_0>', '▁cat', '</s>']);
    expect(tok().encode('a   cat  ').tokens).toEqual(['▁a', '▁cat', '▁', '</s>']);
  });
  it('encode without special tokens, token lookups, decode', () => {
    expect(tok().encode('a cat', { addSpecialTokens: false }).ids).toEqual([4, 5]);
    expect(tok().numSpecialTokens).toBe(1);
    expect(tok().tokenToId('</s>')).toBe(1);
    expect(tok().tokenToId('<extra_id_1>')).toBe(71);
    expect(tok().idToToken(5)).toBe('▁cat');
    expect(tok().vocabSize).toBe(72);
    expect(tok().decode(tok().encode('a cat sat on the mat').ids)).toBe('a cat sat on the mat');
    expect(tok().decode([4, 5, 1], { skipSpecialTokens: false })).toBe('a cat</s>');
  });
});

describe('encodePrompt: padding, truncation, cleanup', () => {
  it('pads with 0 and masks: </s> counts as a real token', () => {
    const e = encodePrompt(tok(), 'a cat sat', 8);
    expect(Array.from(e.ids)).toEqual([4, 5, 13, 1, 0, 0, 0, 0]);
    expect(Array.from(e.mask)).toEqual([1, 1, 1, 1, 0, 0, 0, 0]);
    expect(e.length).toBe(4);
    expect(e.ids).toBeInstanceOf(Int32Array);
  });
  it('truncation keeps </s> last (Hugging Face truncation with add_special_tokens)', () => {
    const e = encodePrompt(tok(), 'a cat sat on the mat', 4);
    expect(Array.from(e.ids)).toEqual([4, 5, 13, 1]);
    expect(e.length).toBe(4);
    expect(Array.from(encodePrompt(tok(), 'a cat', 1).ids)).toEqual([1]);
    expect(() => encodePrompt(tok(), 'a cat', 0)).toThrow(/textLen must be an integer >= 1/);
    const long = encodePrompt(tok(), Array(200).fill('a cat').join(' '), 512);
    expect(long.length).toBe(401);
    expect(long.ids[400]).toBe(1);
    expect(long.ids[401]).toBe(0);
  });
  it('empty and whitespace-only prompts give just </s>', () => {
    for (const p of ['', '   ', '\t\n', '&nbsp;']) {
      const e = encodePrompt(tok(), p, 6);
      expect(Array.from(e.ids)).toEqual([1, 0, 0, 0, 0, 0]);
      expect(e.length).toBe(1);
    }
  });
  it('html entities are unescaped twice and whitespace collapsed, as Wan does', () => {
    expect(cleanPrompt('  a&nbsp;cat &amp;amp;\t\n dog  ')).toBe('a cat & dog');
    expect(Array.from(encodePrompt(tok(), ' a   cat&#32;sat ', 5).ids)).toEqual(Array.from(encodePrompt(tok(), 'a cat sat', 5).ids));
    expect(encodePrompt(tok(), '  a   cat ', 5, { clean: false }).ids[0]).toBe(4);
  });
  it('htmlUnescape and cleanPrompt match Python (html.unescape, re \\s, str.strip) on edge cases', () => {
    const cases: Array<{ text: string; unescaped2: string; clean: string }> = JSON.parse(readFileSync(join(FIX, 'clean-cases.json'), 'utf8'));
    for (const c of cases) {
      expect({ text: c.text, out: htmlUnescape(htmlUnescape(c.text)) }).toEqual({ text: c.text, out: c.unescaped2 });
      expect({ text: c.text, out: cleanPrompt(c.text) }).toEqual({ text: c.text, out: c.clean });
    }
    expect(htmlUnescape('&notit;')).toBe('¬it;');
    expect(htmlUnescape('&#x80;')).toBe('€');
    expect(htmlUnescape('&#128512;')).toBe('😀');
    // names inherited by every JS object are not entities
    expect(htmlUnescape('&constructor &toString; &__proto__')).toBe('&constructor &toString; &__proto__');
  });
  it("ftfy.fix_text (which Wan runs first) is not replicated: the prompts where it changes the ids are exactly these", () => {
    const cases: Array<{ text: string; clean_ftfy: string }> = JSON.parse(readFileSync(join(FIX, 'clean-cases.json'), 'utf8'));
    const differ = cases
      .filter((c) => JSON.stringify(Array.from(encodePrompt(tok(), c.text, 64).ids)) !== JSON.stringify(Array.from(encodePrompt(tok(), c.clean_ftfy, 64, { clean: false }).ids)))
      .map((c) => c.text);
    expect(differ).toEqual([
      'x\u3000y\u00a0z\u2028w\x1c\x1fq\x85r\ufeffs\u200bt', // C0/C1 controls: ftfy deletes \x1c\x1f, decodes \x85 as …
      '“a cat” ‘sat’', // ftfy straightens curly quotes
      'cafÃ© au lait', // mojibake repair
      'a\x1cb',
      'a\x85b',
      '&amp;amp;amp; cat', // ftfy unescapes once more (when the text has no '<')
      '\x1b[31mred\x1b[0m cat', // terminal escapes
    ]);
  });
});

describe('tokenizer: loading and errors', () => {
  let tmp: string;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'sd-tokenizer-'));
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it('a model folder with a tokenizer/ folder loads it', async () => {
    const d = join(tmp, 'model');
    for (const sub of ['transformer', 'vae', 'text_encoder', 'scheduler']) cpSync(join(TINY, sub), join(d, sub), { recursive: true });
    const idx = JSON.parse(readFileSync(join(TINY, 'model_index.json'), 'utf8'));
    idx.tokenizer = ['transformers', 'T5TokenizerFast'];
    writeFileSync(join(d, 'model_index.json'), JSON.stringify(idx));
    cpSync(join(FIX, 'legacy'), join(d, 'tokenizer'), { recursive: true });
    const m = await openModelFolder(d);
    expect(m.tokenizer).not.toBeNull();
    const t = await loadTokenizer(m.tokenizer!.dir);
    expect(Array.from(encodePrompt(t, 'a cat', 4).ids)).toEqual([4, 5, 1, 0]);
  });
  it('missing or malformed tokenizer.json, unsupported pipelines', async () => {
    await expect(loadTokenizer(join(tmp, 'nope'))).rejects.toThrow(/tokenizer.json: missing: the model folder needs tokenizer\/tokenizer.json/);
    const d = join(tmp, 'bad');
    mkdirSync(d);
    writeFileSync(join(d, 'tokenizer.json'), '{"model": ');
    await expect(loadTokenizer(d)).rejects.toThrow(CheckpointError);
    await expect(loadTokenizer(d)).rejects.toThrow(/malformed JSON/);
    const good = JSON.parse(readFileSync(join(FIX, 'legacy', 'tokenizer.json'), 'utf8'));
    expect(() => UnigramTokenizer.fromJson({ ...good, model: { type: 'BPE', vocab: {}, merges: [] } })).toThrow(/only the Unigram \(SentencePiece\) model/);
    expect(() => UnigramTokenizer.fromJson({ ...good, normalizer: { type: 'BertNormalizer' } })).toThrow(/unsupported normalizer type "BertNormalizer"/);
    expect(() => UnigramTokenizer.fromJson({ ...good, pre_tokenizer: { type: 'ByteLevel' } })).toThrow(/unsupported pre_tokenizer type "ByteLevel"/);
    expect(() => UnigramTokenizer.fromJson({ ...good, model: { ...good.model, unk_id: 99999 } })).toThrow(/unk_id 99999 is not a vocab index/);
    expect(() => UnigramTokenizer.fromJson({ ...good, normalizer: { type: 'Precompiled', precompiled_charsmap: Buffer.from([9, 9, 9, 9, 9]).toString('base64') } })).toThrow(
      /precompiled_charsmap is corrupt/,
    );
  });
  it('malformed shapes (null / wrong type where a part belongs) are one-line CheckpointErrors naming the JSON path', () => {
    const good = JSON.parse(readFileSync(join(FIX, 'legacy', 'tokenizer.json'), 'utf8'));
    const vocab = [...good.model.vocab];
    vocab[17] = null;
    const cases: Array<[unknown, RegExp]> = [
      [{ ...good, model: { ...good.model, vocab } }, /model\.vocab\[17\] must be \[piece: string, score: finite number\], got null/],
      [{ ...good, model: { ...good.model, vocab: good.model.vocab.map((e: unknown, i: number) => (i === 3 ? ['x', 1e400] : e)) } }, /model\.vocab\[3\]/],
      [{ ...good, model: null }, /model must be an object, got null/],
      [{ ...good, model: { ...good.model, vocab: null } }, /model\.vocab must be a non-empty list/],
      [{ ...good, added_tokens: [null] }, /added_tokens\[0\] must be an object/],
      [{ ...good, added_tokens: { a: 1 } }, /added_tokens must be a list/],
      [{ ...good, added_tokens: [{ id: -1, content: 'x' }] }, /added_tokens\[0\]\.id must be an integer/],
      [{ ...good, added_tokens: [{ id: 5, content: 'x', lstrip: 'yes' }] }, /added_tokens\[0\]\.lstrip must be true or false/],
      [{ ...good, normalizer: 7 }, /normalizer must be an object/],
      [{ ...good, normalizer: { type: 'Sequence', normalizers: [null] } }, /normalizer\.normalizers\[0\] must be a normalizer object, got null/],
      [{ ...good, normalizer: { type: 'Sequence', normalizers: null } }, /normalizer\.normalizers must be a list/],
      [{ ...good, normalizer: { type: 'Replace', pattern: null, content: 'x' } }, /normalizer\.pattern must be an object/],
      [{ ...good, pre_tokenizer: [] }, /pre_tokenizer must be an object/],
      [{ ...good, pre_tokenizer: { type: 'Sequence', pretokenizers: [null] } }, /pre_tokenizer\.pretokenizers\[0\] must be a pre-tokenizer object/],
      [{ ...good, pre_tokenizer: { type: 'Metaspace', replacement: '' } }, /pre_tokenizer\.replacement must be a string of one character/],
      [{ ...good, pre_tokenizer: { type: 'Metaspace', replacement: null } }, /pre_tokenizer\.replacement/],
      [{ ...good, post_processor: { ...good.post_processor, single: [null] } }, /post_processor\.single\[0\] must be an object/],
      [{ ...good, post_processor: { ...good.post_processor, special_tokens: 5 } }, /post_processor\.special_tokens must be an object/],
      [{ ...good, post_processor: { ...good.post_processor, special_tokens: { '</s>': null } } }, /post_processor\.special_tokens\["<\/s>"\]\.ids must be a list/],
      [{ ...good, post_processor: { ...good.post_processor, single: [{ SpecialToken: { id: 'constructor' } }] } }, /special_tokens\["constructor"\]\.ids/],
      [null, /the top level must be a JSON object/],
      [{ ...good, post_processor: { ...good.post_processor, single: [{ Sequence: { id: 'A' } }, { Sequence: { id: 'A' } }] } }, /post_processor\.single must be a template with exactly one \{Sequence\} item \(\$A\), not 2/],
      [{ ...good, model: { ...good.model, vocab: good.model.vocab.map((e: unknown, i: number) => (i === 9 ? ['x'.repeat(100_000), -1] : e)) } }, /model\.vocab\[9\]\[0\] must be a piece of at most 512 characters/],
    ];
    for (const [json, re] of cases) {
      let err: unknown;
      try {
        UnigramTokenizer.fromJson(json, '/m/tokenizer/tokenizer.json');
      } catch (e) {
        err = e;
      }
      expect(err, String(re)).toBeInstanceOf(CheckpointError);
      const m = (err as Error).message;
      expect(m).toMatch(re);
      expect(m).toContain('/m/tokenizer/tokenizer.json');
      expect(m.split('\n')).toHaveLength(1);
    }
    // the shape errors name the fix
    expect(() => UnigramTokenizer.fromJson({ ...good, model: { ...good.model, vocab } })).toThrow(/download tokenizer\/tokenizer\.json of the model again/);
  });
  it('deeply nested Sequence normalizers are refused, not a stack overflow', () => {
    const good = JSON.parse(readFileSync(join(FIX, 'legacy', 'tokenizer.json'), 'utf8'));
    let n: unknown = { type: 'Lowercase' };
    for (let i = 0; i < 5000; i++) n = { type: 'Sequence', normalizers: [n] };
    expect(() => UnigramTokenizer.fromJson({ ...good, normalizer: n })).toThrow(/nested more than 16 deep/);
  });
  it('token ids beyond the text encoder vocabulary name the fix', () => {
    const good = JSON.parse(readFileSync(join(FIX, 'legacy', 'tokenizer.json'), 'utf8'));
    const t = UnigramTokenizer.fromJson(good, 'x/tokenizer.json');
    expect(t.maxId).toBe(71);
    expect(() => t.checkVocabSize(72)).not.toThrow();
    expect(() => t.checkVocabSize(50, 'm/text_encoder/config.json')).toThrow(/produces token id 71, but the text encoder's embedding has only 50 rows \(vocab_size in m\/text_encoder\/config.json\).*download tokenizer\/ and text_encoder\/ of the same model again/);
  });
  it('older files: Metaspace add_prefix_space instead of prepend_scheme; no post-processor', () => {
    const good = JSON.parse(readFileSync(join(FIX, 'legacy', 'tokenizer.json'), 'utf8'));
    const old = UnigramTokenizer.fromJson({ ...good, pre_tokenizer: { type: 'Metaspace', replacement: '▁', add_prefix_space: true } });
    expect(old.encode('a cat').ids).toEqual([4, 5, 1]);
    const never = UnigramTokenizer.fromJson({ ...good, pre_tokenizer: { type: 'Metaspace', replacement: '▁', add_prefix_space: false }, post_processor: null });
    expect(never.encode('a cat').tokens).toEqual(['a', '▁cat']);
    expect(never.numSpecialTokens).toBe(0);
  });
});
