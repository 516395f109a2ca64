"""Seeded text generators for the tokenizer differential tests and benchmark.

gen_strings(seed, n): n short adversarial strings (multilingual scripts, combining marks in NFC and
NFD form, emoji with skin tones / ZWJ / flags / keycaps, whitespace runs of every Unicode space,
digits of several scripts, code, contractions, special-token text and near misses, control
characters, random assigned code points). All are valid Python str (no lone surrogates): HF's API
takes str.

gen_invalid_bytes(seed, n): byte strings that are not valid UTF-8 (truncated sequences, stray
continuation bytes, overlongs, surrogates, bytes F5..FF) mixed with text.

mixed_corpus(seed, size): about `size` bytes of lines for the throughput benchmark: prose in
several languages, code, numbers, emoji.
"""
import random
import unicodedata

SCRIPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Ünïcödé façade naïve coöperate résumé Æsir Œuvre straße ß ẞ",
    "Ça va? Où est la bibliothèque? L'été dernier j'ai vu l'Île",
    "нещо на Български, Съединените щати, ЁЖИК ёжик",
    "Ελληνικά: Καλημέρα κόσμε, ΣΊΣΥΦΟΣ ς σ",
    "مرحبا بالعالم، هذا نص عربي ١٢٣ ٤٥٦",
    "שלום עולם, זהו טקסט בעברית",
    "नमस्ते दुनिया, यह हिन्दी पाठ है। क्षत्रिय",
    "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่าง",
    "កាន់តែពិសេសអាចខលចេញ",
    "我想在apple工作1314151天～ 你好，世界！這是繁體中文。",
    "日本語のテキスト、カタカナとひらがな。ｶﾀｶﾅ半角",
    "안녕하세요 세계, 한국어 텍스트입니다",
    "Tiếng Việt: Cửa Việt, người Việt Nam",
    "Türkçe: İstanbul'da ılık bir gün; IĞDIR",
    "ქართული ენა, Հայերեն լեզու, ᐃᓄᒃᑎᑐᑦ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 ∀x∈ℝ: x²≥0, ∑ᵢ aᵢ ≤ ∞, ½ ¾ ⅓",
    "ﬁ ﬂ ﬀ Ⅻ ㍿ ① ⑴ ｆｕｌｌｗｉｄｔｈ　ＡＢＣ",
]

COMBINING = ["e\u0301", "a\u0308", "o\u0302\u0323", "n\u0303", "\u1100\u1161\u11a8", "A\u030a", "\u0915\u094d\u0937"]

EMOJI = [
    "🦙", "🚀", "😁", "👍🏽", "👨‍👩‍👧‍👦", "😶‍🌫️", "🏳️‍🌈", "🇫🇷🇯🇵", "1️⃣", "#️⃣", "✅", "❤️", "🧑🏿‍💻",
    "👩‍❤️‍💋‍👨", "🫠", "🤌🏻", "\u2764\ufe0e", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
]

WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\t\t\n",
              "\u00a0", "\u3000", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\u2003", "\u200b", "\u202f",
              "\u1680", "\u205f", " " * 17, "\n" * 5]

DIGITS = ["0", "7", "42", "123", "1234", "12345", "3.14159", "1,000,000", "0x1F", "1e-9", "٣٤٥", "४२",
          "১২৩", "１２３", "²³", "Ⅻ", "99999999999999999999", "-17", "2024-01-31"]

CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}",
    '{"key": [1, 2.5, null, true], "s": "a\\"b"}',
    "<div class=\"a\">&nbsp;&lt;tag&gt;</div>",
    "for (let i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT * FROM t WHERE x >= 10 AND y <> 'z';",
    "    if x:\n        pass\n\n\n",
    "------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "a\\b/c|d~e^f$g@h%i&j*k(l)m[n]o{p}q",
]

CONTRACTIONS = ["I've", "you'll", "he's", "'s", "'S", "'LL", "We'Ve", "a'lL", "don't", "it’s", "'ſ", "'K",
                "'re'd'm", "''s"]

SPECIAL_TEXT = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|im_start|>",
                "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<think>", "<s>", "</s>", "<unk>",
                "<|im_", "<s", "<<s>>", "<|reserved_special_token_0|>", "<|fim_prefix|>", "[INST]", "<0x41>"]


def _random_codepoint(rng):
    while True:
        r = rng.random()
        if r < 0.3:
            cp = rng.randrange(0x20, 0x250)
        elif r < 0.5:
            cp = rng.randrange(0x250, 0x3000)
        elif r < 0.7:
            cp = rng.randrange(0x3000, 0xD800)
        elif r < 0.8:
            cp = rng.randrange(0xE000, 0x10000)
        elif r < 0.9:
            cp = rng.randrange(0x10000, 0x20000)
        elif r < 0.95:
            cp = rng.randrange(0, 0x20)
        else:
            cp = rng.randrange(0x20000, 0x110000)
        # Skip surrogates, and code points unassigned in Unicode 14 (Python 3.11's and PCRE2 10.42's
        # tables): HF's Oniguruma has newer tables, where some of them are letters or digits, so
        # \p{L}/\p{N} would differ (a known, documented difference; see docs/PERF_tokenizer.md).
        if not (0xD800 <= cp < 0xE000) and unicodedata.category(chr(cp)) != "Cn":
            return chr(cp)


def _fragment(rng):
    k = rng.random()
    if k < 0.18:
        s = rng.choice(SCRIPTS)
        a = rng.randrange(len(s))
        return s[a:a + rng.randrange(1, 40)]
    if k < 0.25:
        return rng.choice(COMBINING)
    if k < 0.35:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randrange(1, 4)))
    if k < 0.47:
        return rng.choice(WHITESPACE)
    if k < 0.57:
        return rng.choice(DIGITS)
    if k < 0.65:
        s = rng.choice(CODE)
        a = rng.randrange(len(s))
        return s[a:a + rng.randrange(1, 60)]
    if k < 0.72:
        return rng.choice(CONTRACTIONS)
    if k < 0.80:
        return rng.choice(SPECIAL_TEXT)
    if k < 0.90:
        return "".join(_random_codepoint(rng) for _ in range(rng.randrange(1, 6)))
    words = ["hello", "world", "Hello", "World", "tokenizer", "the", "a", "of", "ABC", "x"]
    return rng.choice(words)


def gen_strings(seed, n):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [_fragment(rng) for _ in range(rng.randrange(1, 9))]
        sep = rng.choice(["", "", " ", "  ", "\n", "\t"])
        out.append(sep.join(parts))
    return out


INVALID = [b"\x80", b"\xbf", b"\xc0\x80", b"\xc3", b"\xe2\x82", b"\xe2\x28\xa1", b"\xed\xa0\x80",
           b"\xf0\x9f\x98", b"\xf0\x9f", b"\xf4\x90\x80\x80", b"\xf5", b"\xff", b"\xfe\xfe", b"\xe0\x80\xaf",
           b"\xf8\x88\x80\x80\x80"]


def gen_invalid_bytes(seed, n):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 6)):
            if rng.random() < 0.5:
                parts.append(rng.choice(INVALID))
            else:
                parts.append(_fragment(rng).encode("utf-8"))
        out.append(b"".join(parts))
    return out


PROSE = [
    "In the beginning of the project, the engineers measured everything twice and wrote it down.",
    "Les ingénieurs ont mesuré le débit du tokenizer sur un corpus de dix mégaoctets.",
    "Die Messung wurde auf einem Kern wiederholt, um Schwankungen zu vermeiden.",
    "Инженеры измерили пропускную способность токенизатора на одном ядре.",
    "工程师们在一个核心上测量了分词器的吞吐量，并记录了结果。",
    "エンジニアはトークナイザーのスループットを測定しました。",
    "El tokenizador convierte el texto en identificadores enteros muy rápidamente.",
    "The results were 12.5 MB/s, 37.1 MB/s and 3,141,592 tokens in 0.084 s 🚀",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]",
    "    for (size_t i = 0; i < n; ++i) out[i] = table[in[i]];",
]


def mixed_corpus(seed, size):
    rng = random.Random(seed)
    lines = []
    total = 0
    while total < size:
        k = rng.random()
        if k < 0.7:
            line = " ".join(rng.choice(PROSE) for _ in range(rng.randrange(1, 4)))
        elif k < 0.9:
            line = " ".join(_fragment(rng) for _ in range(rng.randrange(3, 12)))
        else:
            line = rng.choice(CODE)
        line = line.replace("\n", " ") + "\n"
        lines.append(line)
        total += len(line.encode("utf-8"))
    return "".join(lines)
