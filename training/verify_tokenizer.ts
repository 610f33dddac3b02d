// Checks that the engine's tokenizer (src/io/tokenizer.ts) reading the exported tokenizer.json gives
// exactly the ids training used (training/tokenizer.py), for every grammar caption and odd inputs.
// Usage: npx tsx training/verify_tokenizer.ts <tokenizer dir> <cases.json from tokenizer_cases.py>
import { readFileSync } from 'node:fs';
import { loadTokenizer, encodePrompt } from '../src/io/tokenizer.ts';

const [dir, casesPath] = process.argv.slice(2);
if (!dir || !casesPath) throw new Error('usage: verify_tokenizer.ts <tokenizer dir> <cases.json>');
const cases = JSON.parse(readFileSync(casesPath, 'utf8')) as { text_len: number; cases: { text: string; ids: number[] }[] };
const tok = await loadTokenizer(dir);
let bad = 0;
for (const c of cases.cases) {
  const e = encodePrompt(tok, c.text, cases.text_len);
  const got = Array.from(e.ids.slice(0, e.length));
  if (JSON.stringify(got) !== JSON.stringify(c.ids)) {
    bad++;
    if (bad <= 10) console.log(`MISMATCH ${JSON.stringify(c.text)}: ts ${JSON.stringify(got)} vs python ${JSON.stringify(c.ids)}`);
  }
}
console.log(`${cases.cases.length} prompts, ${bad} mismatches (vocab ${tok.vocabSize})`);
process.exit(bad ? 1 : 0);
