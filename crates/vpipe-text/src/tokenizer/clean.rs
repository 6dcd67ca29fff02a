//! Wan's prompt cleaning (`Wan2.1:wan/modules/tokenizers.py`, `clean="whitespace"`):
//! `basic_clean` = `ftfy.fix_text` + `html.unescape` twice + strip, then `whitespace_clean` =
//! every whitespace run to one space + strip.
//!
//! ftfy (mojibake repair) is out of scope: text is taken as correctly decoded. `html.unescape`
//! is reproduced for numeric references (`&#39;`, `&#x4E2D;`, with or without the `;`) and the
//! common named ones below, each with its `;` (Python also knows ~2200 more names and a few
//! legacy spellings without `;`, such as `&amp`; those pass through unchanged here).

/// Named references decoded by [`clean_prompt`] (HTML5 names; `&name;` only).
const NAMED: [(&str, char); 26] = [
    ("amp", '&'),
    ("lt", '<'),
    ("gt", '>'),
    ("quot", '"'),
    ("apos", '\''),
    ("nbsp", '\u{a0}'),
    ("ensp", '\u{2002}'),
    ("emsp", '\u{2003}'),
    ("thinsp", '\u{2009}'),
    ("ndash", '–'),
    ("mdash", '—'),
    ("lsquo", '‘'),
    ("rsquo", '’'),
    ("ldquo", '“'),
    ("rdquo", '”'),
    ("hellip", '…'),
    ("laquo", '«'),
    ("raquo", '»'),
    ("middot", '·'),
    ("bull", '•'),
    ("copy", '©'),
    ("reg", '®'),
    ("trade", '™'),
    ("times", '×'),
    ("divide", '÷'),
    ("deg", '°'),
];

/// Cleans a prompt as Wan does before tokenising (without ftfy, see the module docs).
pub fn clean_prompt(text: &str) -> String {
    let text = unescape(&unescape(text));
    // Python's `\s` and `str.strip()` also count U+001C..U+001F as whitespace.
    let is_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    text.split(is_space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One pass of `html.unescape` (the subset in the module docs).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match reference(rest) {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The character of the reference at the start of `s` (which starts with `&`) and its length.
fn reference(s: &str) -> Option<(char, usize)> {
    let body = &s[1..];
    if let Some(num) = body.strip_prefix('#') {
        let (hex, digits) = match num.strip_prefix(['x', 'X']) {
            Some(h) => (true, h),
            None => (false, num),
        };
        let n = digits
            .chars()
            .take_while(|c| {
                if hex {
                    c.is_ascii_hexdigit()
                } else {
                    c.is_ascii_digit()
                }
            })
            .count();
        if n == 0 {
            return None;
        }
        let value =
            u32::from_str_radix(&digits[..n], if hex { 16 } else { 10 }).unwrap_or(u32::MAX);
        let mut len = 1 + 1 + usize::from(hex) + n;
        if s[len..].starts_with(';') {
            len += 1;
        }
        // Python gives U+FFFD for 0, surrogates and values past U+10FFFF.
        let c = if value == 0 {
            None
        } else {
            char::from_u32(value)
        };
        return Some((c.unwrap_or('\u{fffd}'), len));
    }
    let name_len = body.chars().take_while(char::is_ascii_alphanumeric).count();
    if !body[name_len..].starts_with(';') {
        return None;
    }
    let name = &body[..name_len];
    NAMED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, c)| (c, 1 + name_len + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(unescape("a &amp;amp; b"), "a &amp; b");
        assert_eq!(unescape("&#65;&#x42&#X43;"), "ABC");
        assert_eq!(unescape("&#0; &#xD800;"), "\u{fffd} \u{fffd}");
        assert_eq!(unescape("&unknown; & &;"), "&unknown; & &;");
        assert_eq!(clean_prompt(" \u{1f}x \u{3000} y\n"), "x y");
    }
}
