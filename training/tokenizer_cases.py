"""Writes every grammar caption (and some odd strings) with the ids training uses, for verify_tokenizer.ts."""
import itertools
import json
import sys

import data
import tokenizer

NEGATIVE_WAN = ('色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，'
                '多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走')
ODD = ['', ' ', 'A Red Circle moving LEFT on a Gray background', '  a red   circle moving left  ', 'a purple hexagon!',
       'a red circle moving left on a dark blue background.', 'ａ ｒｅｄ ｃｉｒｃｌｅ', 'a red circle, moving: left (fast)', NEGATIVE_WAN]


def main(path, text_len):
    texts = [data.caption(*c, b) for c in data.all_combos() for b in data.BACKGROUNDS] + ODD
    cases = [{'text': t, 'ids': tokenizer.encode_padded(t, text_len)[0][:tokenizer.encode_padded(t, text_len)[1]]} for t in texts]
    json.dump({'text_len': text_len, 'cases': cases}, open(path, 'w'), ensure_ascii=False, indent=0)
    print(f'{len(cases)} cases -> {path}')


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512)
