// The UMT5 tokenizer (SentencePiece Unigram, as serialized in a Hugging Face tokenizer.json), and
// the prompt encoding of the Wan pipeline.
//
// Our own implementation of exactly what the UMT5 tokenizer.json uses, following the Rust
// `tokenizers` library step by step (tests compare it with that library's ids):
//   1. added tokens (`</s>`, `<pad>`, `<extra_id_N>`, ...) are split out first (leftmost-longest);
//   2. normalizer: Precompiled (the SentencePiece charsmap: a darts-clone double-array trie applied
//      per grapheme cluster), Replace, Strip, NFC/NFKC/..., Sequence;
//   3. pre-tokenizer: Metaspace (spaces → ▁, prepend_scheme always/first/never, optional split);
//   4. model: Unigram, best segmentation by Viterbi over the piece scores, unknown characters fused
//      into one <unk> (or UTF-8 byte pieces <0xXX> with byte_fallback);
//   5. post-processor: TemplateProcessing (`$A </s>`), with truncation keeping the special tokens.
// Why not @huggingface/tokenizers (0.2.0, installed): its Precompiled normalizer ignores the charsmap
// (an NFKC approximation), its Metaspace never splits, and it ignores byte_fallback (docs/checkpoints.md).

import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { CheckpointError } from '../util/errors.ts';
import { oneLine } from './safetensors.ts';
// a generated table, kept as data: esbuild inlines the JSON into a bundle, so no path lookup is needed
import htmlEntities from './html-entities.json' with { type: 'json' };

type Json = Record<string, unknown>;

function fail(source: string, msg: string): never {
  throw new CheckpointError(`[tokenizer] ${source}: ${msg}`);
}

/** What to do about a tokenizer.json of the wrong shape (appended to every shape error). */
const REDOWNLOAD = 'the file is corrupt or not a Hugging Face UMT5 tokenizer.json: download tokenizer/tokenizer.json of the model again';

/** A short, one-line rendering of a JSON value for messages. */
function brief(v: unknown): string {
  if (v === undefined) return 'nothing (missing)';
  let t: string;
  try {
    t = JSON.stringify(v) ?? String(v);
  } catch {
    t = String(v);
  }
  t = t.replace(/[\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return t.length > 60 ? `${t.slice(0, 57)}...` : t;
}

/** A shape error at JSON path `path` ('model.vocab[17]'): one line with the value found and the fix. */
function bad(source: string, path: string, want: string, got: unknown): never {
  return fail(source, `${path} must be ${want}, got ${brief(got)}; ${REDOWNLOAD}`);
}

function isObj(v: unknown): v is Json {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** `v` as an object (a normalizer, a pre-tokenizer, a template item...), or a shape error. */
function obj(source: string, path: string, v: unknown, want = 'an object'): Json {
  if (!isObj(v)) bad(source, path, want, v);
  return v;
}

/** Longest vocab piece accepted, in UTF-16 units (SentencePiece's trainer accepts at most 512 characters; its default is 16). */
const MAX_PIECE_LENGTH = 512;
/** Nesting limit of Sequence normalizers / pre-tokenizers (real files nest 1 level; recursion is bounded). */
const MAX_NESTING = 16;
/** Largest tokenizer.json read (UMT5's is 16 MB); a bigger file is not a tokenizer. */
export const MAX_TOKENIZER_BYTES = 512 * 1024 * 1024;
/** Largest token id accepted anywhere in the file (UMT5: 256384 ids; 2^24 is generous and exact in f32). */
const MAX_TOKEN_ID = 2 ** 24;

// ---------------------------------------------------------------------------------------------
// Normalizers

interface Normalizer {
  normalize(s: string): string;
}

/**
 * SentencePiece's precompiled charsmap: u32 LE trie size, a darts-clone double array of u32 units,
 * then NUL-terminated replacement strings. Applied like `tokenizers`' Precompiled normalizer: per
 * extended grapheme cluster, the whole cluster (if under 6 UTF-8 bytes) is looked up first, then
 * each of its characters; a lookup takes the shortest matching prefix and replaces the whole chunk.
 */
class PrecompiledCharsmap implements Normalizer {
  private readonly units: Uint32Array;
  private readonly normalized: Uint8Array;
  private readonly cache = new Map<string, string | null>();
  private readonly segmenter = new Intl.Segmenter(undefined, { granularity: 'grapheme' });
  private readonly enc = new TextEncoder();
  private readonly dec = new TextDecoder();

  constructor(blob: Uint8Array, source: string) {
    if (blob.byteLength < 4) fail(source, 'precompiled_charsmap is too short');
    const trieSize = new DataView(blob.buffer, blob.byteOffset, blob.byteLength).getUint32(0, true);
    if (trieSize % 4 !== 0 || 4 + trieSize > blob.byteLength) fail(source, `precompiled_charsmap is corrupt (trie size ${trieSize}, blob ${blob.byteLength} bytes)`);
    this.units = new Uint32Array(blob.slice(4, 4 + trieSize).buffer);
    this.normalized = blob.slice(4 + trieSize);
  }

  /** The replacement of the shortest prefix of `chunk` found in the trie, or null. */
  transform(chunk: string): string | null {
    const hit = this.cache.get(chunk);
    if (hit !== undefined) return hit;
    const r = this.lookup(this.enc.encode(chunk));
    if (this.cache.size < 100_000) this.cache.set(chunk, r);
    return r;
  }

  private lookup(key: Uint8Array): string | null {
    const a = this.units;
    if (a.length === 0) return null;
    let pos = offsetOf(a[0]!);
    for (const c of key) {
      if (c === 0) break;
      pos ^= c;
      if (pos >= a.length) return null;
      const unit = a[pos]!;
      if ((unit & 0x800000ff) >>> 0 !== c) return null; // label
      pos ^= offsetOf(unit);
      if ((unit >>> 8) & 1) {
        // has leaf: the value unit sits at the child position
        if (pos >= a.length) return null;
        const index = a[pos]! & 0x7fffffff;
        if (index >= this.normalized.length) return null;
        let end = index;
        while (end < this.normalized.length && this.normalized[end] !== 0) end++;
        return this.dec.decode(this.normalized.subarray(index, end));
      }
    }
    return null;
  }

  normalize(s: string): string {
    let out = '';
    for (const { segment: g } of this.segmenter.segment(s)) {
      if (utf8Length(g) < 6) {
        const t = this.transform(g);
        if (t !== null) {
          out += t;
          continue;
        }
      }
      for (const ch of g) out += this.transform(ch) ?? ch;
    }
    return out;
  }
}

function offsetOf(unit: number): number {
  return (unit >>> 10) << ((unit & (1 << 9)) >>> 6);
}

function utf8Length(s: string): number {
  let n = 0;
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    n += c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
  }
  return n;
}

/** Unicode White_Space (what Rust's char::is_whitespace tests). */
const RUST_WS = '\\t\\n\\v\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';

function buildNormalizer(cfg: unknown, source: string, path = 'normalizer', depth = 0): Normalizer | null {
  if (cfg === null || cfg === undefined) return null;
  const c = obj(source, path, cfg, 'an object with a "type" (or null)');
  if (depth > MAX_NESTING) fail(source, `${path}: Sequence normalizers nested more than ${MAX_NESTING} deep; ${REDOWNLOAD}`);
  switch (c.type) {
    case 'Sequence': {
      if (!Array.isArray(c.normalizers)) bad(source, `${path}.normalizers`, 'a list of normalizers', c.normalizers);
      const parts = c.normalizers
        .map((n, i) => buildNormalizer(obj(source, `${path}.normalizers[${i}]`, n, 'a normalizer object'), source, `${path}.normalizers[${i}]`, depth + 1))
        .filter((n): n is Normalizer => n !== null);
      return { normalize: (s: string) => parts.reduce<string>((acc, n) => n.normalize(acc), s) };
    }
    case 'Precompiled': {
      const b64 = c.precompiled_charsmap;
      if (b64 === null || b64 === undefined || b64 === '') return null; // an empty charsmap is the identity
      if (typeof b64 !== 'string') bad(source, `${path}.precompiled_charsmap`, 'a base64 string', b64);
      return new PrecompiledCharsmap(new Uint8Array(Buffer.from(b64, 'base64')), source);
    }
    case 'Replace': {
      const p = obj(source, `${path}.pattern`, c.pattern, 'an object {String} or {Regex}');
      const content = typeof c.content === 'string' ? c.content : bad(source, `${path}.content`, 'a string', c.content);
      if (typeof p.String === 'string') {
        const from = p.String;
        return { normalize: (s) => (from === '' ? s : s.split(from).join(content)) };
      }
      if (typeof p.Regex === 'string') {
        let re: RegExp;
        try {
          re = new RegExp(p.Regex, 'gu');
        } catch (err) {
          fail(source, `Replace normalizer regex ${brief(p.Regex)} is not supported (${oneLine((err as Error).message)})`);
        }
        return { normalize: (s) => s.replace(re, () => content) };
      }
      return bad(source, `${path}.pattern`, 'an object {String} or {Regex}', p);
    }
    case 'Strip': {
      for (const k of ['strip_left', 'strip_right']) if (c[k] !== undefined && typeof c[k] !== 'boolean') bad(source, `${path}.${k}`, 'true or false', c[k]);
      const left = c.strip_left !== false;
      const right = c.strip_right !== false;
      const l = new RegExp(`^[${RUST_WS}]+`, 'u');
      const r = new RegExp(`[${RUST_WS}]+$`, 'u');
      return { normalize: (s) => (right ? (left ? s.replace(l, '') : s).replace(r, '') : left ? s.replace(l, '') : s) };
    }
    case 'NFC':
    case 'NFD':
    case 'NFKC':
    case 'NFKD': {
      const form = c.type;
      return { normalize: (s) => s.normalize(form) };
    }
    case 'Lowercase':
      return { normalize: (s) => s.toLowerCase() };
    case 'Prepend': {
      const pre = typeof c.prepend === 'string' ? c.prepend : bad(source, `${path}.prepend`, 'a string', c.prepend);
      return { normalize: (s) => (s === '' ? s : pre + s) };
    }
    default:
      return fail(source, `${path}: unsupported normalizer type ${brief(c.type)} (supported: Sequence, Precompiled, Replace, Strip, NFC, NFD, NFKC, NFKD, Lowercase, Prepend)`);
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers. Each turns one normalized segment into words; `first` says the segment starts the
// original text (Metaspace prepend_scheme 'first').

type PreTokenizer = (s: string, first: boolean) => string[];

function buildPreTokenizer(cfg: unknown, source: string, path = 'pre_tokenizer', depth = 0): PreTokenizer {
  if (cfg === null || cfg === undefined) return (s) => (s === '' ? [] : [s]);
  const c = obj(source, path, cfg, 'an object with a "type" (or null)');
  if (depth > MAX_NESTING) fail(source, `${path}: Sequence pre-tokenizers nested more than ${MAX_NESTING} deep; ${REDOWNLOAD}`);
  switch (c.type) {
    case 'Sequence': {
      if (!Array.isArray(c.pretokenizers)) bad(source, `${path}.pretokenizers`, 'a list of pre-tokenizers', c.pretokenizers);
      const parts = c.pretokenizers.map((p, i) => buildPreTokenizer(obj(source, `${path}.pretokenizers[${i}]`, p, 'a pre-tokenizer object'), source, `${path}.pretokenizers[${i}]`, depth + 1));
      return (s, first) => {
        let words = [s];
        for (const p of parts) words = words.flatMap((w, i) => p(w, first && i === 0));
        return words;
      };
    }
    case 'Metaspace': {
      // one character, as the Rust library's `char` (an empty one would never advance the split below)
      const rep = c.replacement === undefined ? '\u2581' : c.replacement;
      if (typeof rep !== 'string' || [...rep].length !== 1) bad(source, `${path}.replacement`, 'a string of one character (▁)', rep);
      let scheme = c.prepend_scheme;
      if (scheme === undefined) scheme = c.add_prefix_space === false ? 'never' : 'always'; // tokenizers < 0.15 files
      if (scheme !== 'always' && scheme !== 'first' && scheme !== 'never') fail(source, `${path}: Metaspace prepend_scheme ${brief(scheme)} is not always/first/never`);
      if (c.split !== undefined && typeof c.split !== 'boolean') bad(source, `${path}.split`, 'true or false', c.split);
      const split = c.split !== false;
      return (s, first) => {
        let t = s.split(' ').join(rep);
        if (t !== '' && !t.startsWith(rep) && (scheme === 'always' || (scheme === 'first' && first))) t = rep + t;
        if (!split) return t === '' ? [] : [t];
        // split before every replacement character (MergedWithNext), dropping empty pieces
        const out: string[] = [];
        let start = 0;
        for (let i = t.indexOf(rep, 1); i !== -1; i = t.indexOf(rep, i + rep.length)) {
          if (i > start) out.push(t.slice(start, i));
          start = i;
        }
        if (start < t.length) out.push(t.slice(start));
        return out;
      };
    }
    case 'WhitespaceSplit':
      return (s) => s.split(new RegExp(`[${RUST_WS}]+`, 'u')).filter((w) => w !== '');
    default:
      return fail(source, `${path}: unsupported pre_tokenizer type ${brief(c.type)} (supported: Metaspace, WhitespaceSplit, Sequence)`);
  }
}

// ---------------------------------------------------------------------------------------------
// Added tokens

interface AddedToken {
  id: number;
  content: string;
  special: boolean;
  normalized: boolean;
  lstrip: boolean;
  rstrip: boolean;
  singleWord: boolean;
}

type Piece = { text: string; start: number } | { token: AddedToken };

const WORD_CHAR = /[\p{L}\p{N}_]/u;
const WS_CHAR = new RegExp(`[${RUST_WS}]`, 'u');

/** Split `text` (a segment starting at `base` in the original) on `tokens`, leftmost-longest. */
function splitAdded(text: string, base: number, tokens: readonly AddedToken[]): Piece[] {
  if (tokens.length === 0 || text === '') return text === '' ? [] : [{ text, start: base }];
  const out: Piece[] = [];
  let segStart = 0;
  let i = 0;
  while (i < text.length) {
    let best: AddedToken | null = null;
    for (const t of tokens) {
      if ((best === null || t.content.length > best.content.length) && text.startsWith(t.content, i)) {
        if (t.singleWord) {
          const before = i > 0 ? text[i - 1]! : '';
          const after = text[i + t.content.length] ?? '';
          if ((before && WORD_CHAR.test(before)) || (after && WORD_CHAR.test(after))) continue;
        }
        best = t;
      }
    }
    if (!best) {
      i++;
      continue;
    }
    let mStart = i;
    let mEnd = i + best.content.length;
    if (best.lstrip) while (mStart > segStart && WS_CHAR.test(text[mStart - 1]!)) mStart--;
    if (best.rstrip) while (mEnd < text.length && WS_CHAR.test(text[mEnd]!)) mEnd++;
    if (mStart > segStart) out.push({ text: text.slice(segStart, mStart), start: base + segStart });
    out.push({ token: best });
    segStart = mEnd;
    i = mEnd;
  }
  if (segStart < text.length) out.push({ text: text.slice(segStart), start: base + segStart });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The tokenizer

export interface Encoding {
  ids: number[];
  tokens: string[];
}

export class UnigramTokenizer {
  /** piece → id */
  private readonly pieceToId = new Map<string, number>();
  private readonly pieces: string[];
  private readonly scores: Float64Array;
  /** the distinct lengths (UTF-16 units) of the vocab pieces, ascending: the only spans Viterbi looks up */
  private readonly pieceLengths: Int32Array;
  private readonly unkScore: number;
  private readonly byteIds: Int32Array | null;
  private readonly added: AddedToken[];
  private readonly addedById = new Map<number, AddedToken>();
  private readonly normalizer: Normalizer | null;
  private readonly preTokenize: PreTokenizer;
  /** the single-sequence template: 'A' for the text, or special-token ids */
  private readonly template: Array<'A' | number[]>;
  readonly unkId: number;
  readonly byteFallback: boolean;

  private constructor(json: Json, readonly source: string) {
    const m = obj(source, 'model', json.model);
    if (m.type !== 'Unigram') fail(source, `model type is ${brief(m.type)}; only the Unigram (SentencePiece) model of the UMT5 tokenizer is supported`);
    if (!Array.isArray(m.vocab) || m.vocab.length === 0) bad(source, 'model.vocab', 'a non-empty list of [piece, score]', Array.isArray(m.vocab) ? [] : m.vocab);
    if (m.vocab.length > MAX_TOKEN_ID) fail(source, `model.vocab has ${m.vocab.length} entries, more than the ${MAX_TOKEN_ID} accepted; ${REDOWNLOAD}`);
    const n = m.vocab.length;
    this.pieces = new Array<string>(n);
    this.scores = new Float64Array(n);
    let minScore = Infinity;
    const lengths = new Set<number>();
    for (let i = 0; i < n; i++) {
      const e = m.vocab[i] as unknown;
      if (!Array.isArray(e) || e.length !== 2 || typeof e[0] !== 'string' || typeof e[1] !== 'number' || !Number.isFinite(e[1])) {
        bad(source, `model.vocab[${i}]`, '[piece: string, score: finite number]', e);
      }
      const [piece, score] = e as [string, number];
      // SentencePiece's trainer caps pieces at 512 (max_sentencepiece_length, default 16); a longer
      // one is corrupt, and would make every long word cost (word length × piece length)
      if (piece.length > MAX_PIECE_LENGTH) bad(source, `model.vocab[${i}][0]`, `a piece of at most ${MAX_PIECE_LENGTH} characters`, piece);
      this.pieces[i] = piece;
      this.scores[i] = score;
      if (!this.pieceToId.has(piece)) this.pieceToId.set(piece, i);
      if (score < minScore) minScore = score;
      if (piece.length > 0) lengths.add(piece.length);
    }
    this.pieceLengths = Int32Array.from([...lengths].sort((a, b) => a - b));
    this.unkScore = minScore - 10; // kUnkPenalty, as SentencePiece and tokenizers
    if (typeof m.unk_id !== 'number' || !Number.isInteger(m.unk_id) || m.unk_id < 0 || m.unk_id >= n) fail(source, `unk_id ${brief(m.unk_id)} is not a vocab index (0..${n - 1}); ${REDOWNLOAD}`);
    if (m.byte_fallback !== undefined && m.byte_fallback !== null && typeof m.byte_fallback !== 'boolean') bad(source, 'model.byte_fallback', 'true or false', m.byte_fallback);
    this.unkId = m.unk_id;
    this.byteFallback = m.byte_fallback === true;
    if (this.byteFallback) {
      this.byteIds = new Int32Array(256).fill(-1);
      for (let b = 0; b < 256; b++) this.byteIds[b] = this.pieceToId.get(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`) ?? -1;
    } else {
      this.byteIds = null;
    }

    this.added = [];
    const addedList = json.added_tokens ?? [];
    if (!Array.isArray(addedList)) bad(source, 'added_tokens', 'a list of token objects', addedList);
    for (let i = 0; i < addedList.length; i++) {
      const t = obj(source, `added_tokens[${i}]`, addedList[i], 'an object {id, content, ...}');
      if (!isTokenId(t.id)) bad(source, `added_tokens[${i}].id`, `an integer in 0..${MAX_TOKEN_ID - 1}`, t.id);
      if (typeof t.content !== 'string' || t.content === '') bad(source, `added_tokens[${i}].content`, 'a non-empty string', t.content);
      for (const k of ['special', 'normalized', 'lstrip', 'rstrip', 'single_word']) {
        if (t[k] !== undefined && t[k] !== null && typeof t[k] !== 'boolean') bad(source, `added_tokens[${i}].${k}`, 'true or false', t[k]);
      }
      const tok: AddedToken = {
        id: t.id,
        content: t.content,
        special: t.special === true,
        normalized: t.normalized === true,
        lstrip: t.lstrip === true,
        rstrip: t.rstrip === true,
        singleWord: t.single_word === true,
      };
      this.added.push(tok);
      this.addedById.set(tok.id, tok);
    }
    this.normalizer = buildNormalizer(json.normalizer, source);
    this.preTokenize = buildPreTokenizer(json.pre_tokenizer, source);
    this.template = buildTemplate(json.post_processor, source);
  }

  /** Parse a tokenizer.json object. Every malformed part is a one-line CheckpointError naming its JSON path. */
  static fromJson(json: unknown, source = 'tokenizer.json'): UnigramTokenizer {
    if (!isObj(json)) bad(source, 'the top level', 'a JSON object', Array.isArray(json) ? '[...]' : json);
    return new UnigramTokenizer(json, source);
  }

  get vocabSize(): number {
    return this.pieces.length;
  }
  /** The largest token id this tokenizer can produce (vocab pieces, added tokens, template ids). */
  get maxId(): number {
    let m = this.pieces.length - 1;
    for (const t of this.added) m = Math.max(m, t.id);
    for (const t of this.template) if (t !== 'A') for (const id of t) m = Math.max(m, id);
    return m;
  }
  /**
   * Check that every id this tokenizer can produce has a row in the text encoder's embedding table
   * (`vocab_size` of text_encoder/config.json, read from `configFile`). Out-of-range ids would read
   * past the table (the GPU gather writes zeros: a silently wrong prompt), so they are refused here.
   */
  checkVocabSize(vocabSize: number, configFile = 'text_encoder/config.json'): void {
    const max = this.maxId;
    if (max >= vocabSize) {
      throw new CheckpointError(
        `[tokenizer] ${this.source}: produces token id ${max}, but the text encoder's embedding has only ${vocabSize} rows (vocab_size in ${configFile}): ` +
          'the tokenizer and the text encoder come from different models; download tokenizer/ and text_encoder/ of the same model again',
      );
    }
  }
  /** The number of special tokens the template adds to one sequence (1 for UMT5: `</s>`). */
  get numSpecialTokens(): number {
    return this.template.reduce((a, t) => a + (t === 'A' ? 0 : t.length), 0);
  }
  tokenToId(token: string): number | undefined {
    const a = this.added.find((t) => t.content === token);
    return a ? a.id : this.pieceToId.get(token);
  }
  idToToken(id: number): string | undefined {
    return this.addedById.get(id)?.content ?? this.pieces[id];
  }

  /** Token ids of `text` (no truncation, no padding); `addSpecialTokens` applies the template. */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): Encoding {
    const ids: number[] = [];
    const tokens: string[] = [];
    const nonNorm = this.added.filter((t) => !t.normalized);
    const norm = this.added.filter((t) => t.normalized);
    for (const p of splitAdded(text, 0, nonNorm)) {
      if ('token' in p) {
        ids.push(p.token.id);
        tokens.push(p.token.content);
        continue;
      }
      const normalized = this.normalizer ? this.normalizer.normalize(p.text) : p.text;
      for (const q of splitAdded(normalized, p.start, norm)) {
        if ('token' in q) {
          ids.push(q.token.id);
          tokens.push(q.token.content);
          continue;
        }
        // `first`: the segment begins the original text (offset 0), as tokenizers' 'first' scheme
        for (const word of this.preTokenize(q.text, p.start === 0 && q.start === p.start)) this.tokenizeWord(word, ids, tokens);
      }
    }
    if (opts.addSpecialTokens === false) return { ids, tokens };
    return this.applyTemplate({ ids, tokens });
  }

  /** Wrap an encoding with the template's special tokens (`$A </s>` for UMT5). */
  applyTemplate(e: Encoding): Encoding {
    const ids: number[] = [];
    const tokens: string[] = [];
    for (const t of this.template) {
      if (t === 'A') {
        ids.push(...e.ids);
        tokens.push(...e.tokens);
      } else {
        for (const id of t) {
          ids.push(id);
          tokens.push(this.idToToken(id) ?? '');
        }
      }
    }
    return { ids, tokens };
  }

  /** Viterbi over one word (a Metaspace piece), appending ids and pieces. */
  private tokenizeWord(w: string, ids: number[], tokens: string[]): void {
    const n = w.length; // UTF-16 units; pieces are whole code points, so boundaries line up
    if (n === 0) return;
    const best = new Float64Array(n + 1).fill(-Infinity);
    const from = new Int32Array(n + 1).fill(-1);
    const idAt = new Int32Array(n + 1).fill(-1);
    best[0] = 0;
    for (let s = 0; s < n; s++) {
      if (from[s] === -1 && s !== 0) continue; // unreachable (cannot happen: every char gets a node)
      const base = best[s]!;
      const cp = w.codePointAt(s)!;
      const mblen = cp > 0xffff ? 2 : 1;
      let single = false;
      for (const len of this.pieceLengths) {
        const e = s + len;
        if (e > n) break;
        // skip ends inside a surrogate pair
        if (e < n) {
          const c = w.charCodeAt(e);
          if (c >= 0xdc00 && c <= 0xdfff && e > 0 && w.charCodeAt(e - 1) >= 0xd800 && w.charCodeAt(e - 1) <= 0xdbff) continue;
        }
        const id = this.pieceToId.get(w.slice(s, e));
        if (id === undefined) continue;
        const score = base + this.scores[id]!;
        if (from[e] === -1 || score > best[e]!) {
          best[e] = score;
          from[e] = s;
          idAt[e] = id;
        }
        if (e - s === mblen) single = true;
      }
      if (!single) {
        const e = s + mblen;
        const score = base + this.unkScore;
        if (from[e] === -1 || score > best[e]!) {
          best[e] = score;
          from[e] = s;
          idAt[e] = this.unkId;
        }
      }
      if (mblen === 2) s++; // the low surrogate is not a start position
    }
    // backtrack, fusing consecutive unknowns into one piece
    const strs: string[] = [];
    let unkRun = '';
    for (let e = n; e > 0; ) {
      const s = from[e]!;
      const piece = w.slice(s, e);
      if (idAt[e] === this.unkId) {
        unkRun = piece + unkRun;
      } else {
        if (unkRun) strs.push(unkRun);
        unkRun = '';
        strs.push(piece);
      }
      e = s;
    }
    if (unkRun) strs.push(unkRun);
    strs.reverse();
    for (const str of strs) {
      const id = this.pieceToId.get(str);
      if (id !== undefined) {
        ids.push(id);
        tokens.push(str);
        continue;
      }
      if (this.byteIds) {
        const bytes = new TextEncoder().encode(str);
        const bids = Array.from(bytes, (b) => this.byteIds![b]!);
        if (bids.every((b) => b >= 0)) {
          for (const b of bids) {
            ids.push(b);
            tokens.push(this.pieces[b]!);
          }
          continue;
        }
      }
      ids.push(this.unkId);
      tokens.push(str);
    }
  }

  /** Text of `ids` (for debugging and tests): pieces joined, ▁ → space, byte pieces decoded. */
  decode(ids: readonly number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    const skip = opts.skipSpecialTokens !== false;
    const bytes: number[] = [];
    let out = '';
    const flush = () => {
      if (bytes.length) out += new TextDecoder().decode(Uint8Array.from(bytes));
      bytes.length = 0;
    };
    for (const id of ids) {
      const a = this.addedById.get(id);
      if (a) {
        if (!(skip && a.special)) {
          flush();
          out += a.content;
        }
        continue;
      }
      const p = this.pieces[id];
      if (p === undefined) continue;
      const m = /^<0x([0-9A-F]{2})>$/.exec(p);
      if (m && this.byteFallback) {
        bytes.push(parseInt(m[1]!, 16));
        continue;
      }
      flush();
      out += p;
    }
    flush();
    out = out.split('\u2581').join(' ');
    return out.startsWith(' ') ? out.slice(1) : out;
  }
}

function isTokenId(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 && v < MAX_TOKEN_ID;
}

function buildTemplate(cfg: unknown, source: string): Array<'A' | number[]> {
  if (cfg === null || cfg === undefined) return ['A'];
  const c = obj(source, 'post_processor', cfg, 'an object with a "type" (or null)');
  if (c.type !== 'TemplateProcessing') fail(source, `unsupported post_processor type ${brief(c.type)} (supported: TemplateProcessing)`);
  const specials = obj(source, 'post_processor.special_tokens', c.special_tokens ?? {});
  if (!Array.isArray(c.single)) bad(source, 'post_processor.single', 'a template list', c.single);
  const items = c.single.map((item, i) => {
    const path = `post_processor.single[${i}]`;
    const it = obj(source, path, item, 'an object {Sequence} or {SpecialToken}');
    if (isObj(it.Sequence)) return 'A' as const;
    const st = it.SpecialToken;
    if (isObj(st) && typeof st.id === 'string') {
      // an own property only: a name such as 'constructor' must not find Object.prototype's
      const sp = Object.prototype.hasOwnProperty.call(specials, st.id) ? specials[st.id] : undefined;
      const ids = isObj(sp) ? sp.ids : undefined;
      if (!Array.isArray(ids) || ids.length === 0 || !ids.every(isTokenId)) {
        bad(source, `post_processor.special_tokens[${brief(st.id)}].ids`, `a list of integers in 0..${MAX_TOKEN_ID - 1}`, ids);
      }
      return ids as number[];
    }
    return bad(source, path, 'an object {Sequence} or {SpecialToken: {id}}', item);
  });
  // exactly one $A: encodePrompt truncates the text to text_len minus the special tokens
  const seqs = items.filter((t) => t === 'A').length;
  if (seqs !== 1) bad(source, 'post_processor.single', `a template with exactly one {Sequence} item ($A), not ${seqs}`, c.single);
  return items;
}

/** Load `dir/tokenizer.json` (a model folder's tokenizer/). */
export async function loadTokenizer(dir: string): Promise<UnigramTokenizer> {
  const p = join(dir, 'tokenizer.json');
  let text: string;
  try {
    const st = await fsp.stat(p);
    if (st.isFile() && st.size > MAX_TOKENIZER_BYTES) {
      throw new CheckpointError(`[tokenizer] ${p}: ${st.size} bytes, more than the ${MAX_TOKENIZER_BYTES} accepted (UMT5's is 16 MB); ${REDOWNLOAD}`);
    }
    text = await fsp.readFile(p, 'utf8');
  } catch (err) {
    if (err instanceof CheckpointError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'missing' : code === 'ELOOP' ? 'symlink loop (ELOOP)' : code === 'EACCES' || code === 'EPERM' ? 'not readable (permission denied)' : code === 'EISDIR' ? 'is a folder' : `cannot read (${code ?? oneLine((err as Error).message)})`;
    throw new CheckpointError(`[tokenizer] ${p}: ${why}: the model folder needs tokenizer/tokenizer.json (the UMT5 tokenizer)`, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new CheckpointError(`[tokenizer] ${p}: malformed JSON (${oneLine((err as Error).message)}); ${REDOWNLOAD}`, { cause: err });
  }
  return UnigramTokenizer.fromJson(json, p);
}

// ---------------------------------------------------------------------------------------------
// Wan's prompt cleaning and encoding

// Maps, not the parsed objects: an object lookup would also find inherited names ('constructor')
const HTML5_ENTITIES: ReadonlyMap<string, string> = new Map(Object.entries(htmlEntities.html5));
const INVALID_CHARREFS: ReadonlyMap<number, string> = new Map(Object.entries(htmlEntities.invalidCharrefs).map(([k, v]) => [Number(k), v]));
const INVALID_CODEPOINTS: ReadonlySet<number> = new Set(htmlEntities.invalidCodepoints);

/** Python's html.unescape(), exactly (HTML5 named references, numeric references with fix-ups). */
export function htmlUnescape(s: string): string {
  if (!s.includes('&')) return s;
  return s.replace(/&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)/gu, (whole, ref: string) => {
    if (ref[0] === '#') {
      const hex = ref[1] === 'x' || ref[1] === 'X';
      const digits = ref.slice(hex ? 2 : 1).replace(/;$/, '');
      const num = hex ? parseInt(digits, 16) : Number(digits);
      const fix = INVALID_CHARREFS.get(num);
      if (fix !== undefined) return fix;
      if ((num >= 0xd800 && num <= 0xdfff) || num > 0x10ffff) return '\ufffd';
      if (INVALID_CODEPOINTS.has(num)) return '';
      return String.fromCodePoint(num);
    }
    const named = HTML5_ENTITIES.get(ref);
    if (named !== undefined) return named;
    // the longest prefix that is a name (HTML5 allows some names without ';')
    const cps = Array.from(ref);
    for (let x = cps.length - 1; x > 1; x--) {
      const pre = cps.slice(0, x).join('');
      const v = HTML5_ENTITIES.get(pre);
      if (v !== undefined) return v + cps.slice(x).join('');
    }
    return whole;
  });
}

/** Python's whitespace (str.isspace / re `\s` on str): what Wan's regex and strip() remove. */
const PY_WS = '\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const PY_WS_RUN = new RegExp(`[${PY_WS}]+`, 'gu');
const PY_STRIP = new RegExp(`^[${PY_WS}]+|[${PY_WS}]+$`, 'gu');

/**
 * Wan's prompt cleaning (`HuggingfaceTokenizer(clean='whitespace')`, also diffusers' `prompt_clean`):
 * html.unescape twice, strip, collapse whitespace runs to one space, strip. Wan first runs
 * ftfy.fix_text, which is not replicated (docs/checkpoints.md lists what that changes).
 */
export function cleanPrompt(text: string): string {
  let t = htmlUnescape(htmlUnescape(text)).replace(PY_STRIP, '');
  t = t.replace(PY_WS_RUN, ' ');
  return t.replace(PY_STRIP, '');
}

export interface EncodedPrompt {
  /** token ids, `</s>` last, padded with 0 (`<pad>`) to textLen */
  ids: Int32Array;
  /** 1 for real tokens (including `</s>`), 0 for padding */
  mask: Int32Array;
  /** number of real tokens (what Wan trims the encoder output to) */
  length: number;
  /** tokens of the prompt (without special tokens) before truncation to textLen; > length - specials when cut */
  promptTokens: number;
}

/**
 * Encode a prompt the way the Wan pipeline feeds the text encoder: cleaned (cleanPrompt), special
 * tokens added (`</s>`), truncated to textLen keeping `</s>` last (as Hugging Face truncation with
 * add_special_tokens does), padded with 0 to textLen.
 */
export function encodePrompt(tok: UnigramTokenizer, text: string, textLen = 512, opts: { clean?: boolean } = {}): EncodedPrompt {
  const nSpecial = tok.numSpecialTokens;
  if (!Number.isInteger(textLen) || textLen < Math.max(1, nSpecial)) {
    throw new CheckpointError(`[tokenizer] textLen must be an integer >= ${Math.max(1, nSpecial)} (room for the special tokens), got ${textLen}`);
  }
  const body = tok.encode(opts.clean === false ? text : cleanPrompt(text), { addSpecialTokens: false });
  const keep = textLen - nSpecial;
  const full = tok.applyTemplate({ ids: body.ids.slice(0, keep), tokens: body.tokens.slice(0, keep) });
  const ids = new Int32Array(textLen);
  const mask = new Int32Array(textLen);
  ids.set(full.ids);
  mask.fill(1, 0, full.ids.length);
  return { ids, mask, length: full.ids.length, promptTokens: body.ids.length };
}
