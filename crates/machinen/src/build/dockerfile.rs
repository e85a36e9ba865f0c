//! The Dockerfile subset `machinen build` takes: reading it into
//! instructions (line continuations, comments, the JSON and shell forms) and
//! the word lexer with Docker's variable substitution (`$V`, `${V}`,
//! `${V:-default}`, `${V:+alt}`, quotes and backslash escapes).
//!
//! Anything outside the subset is refused here, before a VM boots, naming
//! the instruction and its line.

use std::collections::BTreeMap;

use crate::error::{fail, ErrorCode, Failure};

/// Bound on a Dockerfile's size; a larger one is not a Dockerfile.
pub const MAX_BYTES: usize = 1 << 20;

/// The instructions the subset knows.
pub const SUPPORTED: &[&str] = &[
    "FROM",
    "RUN",
    "COPY",
    "ADD",
    "ENV",
    "ARG",
    "WORKDIR",
    "USER",
    "CMD",
    "ENTRYPOINT",
    "EXPOSE",
    "LABEL",
];

/// Docker instructions outside the subset (refused as unsupported rather
/// than unknown).
const KNOWN_UNSUPPORTED: &[&str] = &[
    "SHELL",
    "VOLUME",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ONBUILD",
    "MAINTAINER",
];

/// One instruction as written: its keyword (upper case), its flags
/// (`--name=value` before the arguments) and the rest of its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line where it starts.
    pub line: usize,
    pub keyword: String,
    pub flags: Vec<(String, String)>,
    /// The arguments after the flags, continuation lines joined.
    pub args: String,
}

impl Instruction {
    /// The exec (JSON array) form of the arguments, when they are one.
    pub fn json_form(&self) -> Option<Vec<String>> {
        let t = self.args.trim();
        if !t.starts_with('[') {
            return None;
        }
        serde_json::from_str::<Vec<String>>(t).ok()
    }
}

pub(crate) fn invalid(line: usize, message: impl std::fmt::Display) -> Failure {
    fail(
        ErrorCode::BuildDockerfileInvalid,
        format!("Dockerfile line {line}: {message}"),
    )
    .hint("fix the Dockerfile; `machinen build --help` lists the instructions and flags it takes")
}

pub(crate) fn unsupported(line: usize, message: impl std::fmt::Display) -> Failure {
    fail(
        ErrorCode::BuildInstructionUnsupported,
        format!("Dockerfile line {line}: {message}"),
    )
    .hint(format!(
        "machinen build takes {}; run other steps with RUN, or bake with `machinen provision`",
        SUPPORTED.join(", ")
    ))
}

/// Read `text` into instructions. Parser directives (`# syntax=`) are
/// comments here; an `escape` directive other than `\` is refused.
pub fn parse(text: &str) -> Result<Vec<Instruction>, Failure> {
    if text.len() > MAX_BYTES {
        return Err(invalid(
            1,
            format!("the file is over {} KiB", MAX_BYTES >> 10),
        ));
    }
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let mut directives = true;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim_start();
        if directives {
            if let Some(d) = trimmed.strip_prefix('#') {
                let d = d.trim();
                if let Some((k, v)) = d.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("escape") && v.trim() != "\\" {
                        return Err(unsupported(
                            n,
                            format!("the escape directive {:?} (only \\ is supported)", v.trim()),
                        ));
                    }
                    continue;
                }
            }
            directives = false;
        }
        // Comments are whole lines, also inside a continued instruction.
        if trimmed.starts_with('#') {
            continue;
        }
        let (body, continued) = match raw.trim_end().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (raw, false),
        };
        match &mut current {
            Some((_, acc)) => {
                acc.push(' ');
                acc.push_str(body.trim());
            }
            None => {
                if body.trim().is_empty() {
                    continue;
                }
                current = Some((n, body.trim().to_string()));
            }
        }
        if !continued {
            if let Some((line, text)) = current.take() {
                out.push(split(line, &text)?);
            }
        }
    }
    if let Some((line, text)) = current.take() {
        out.push(split(line, &text)?);
    }
    Ok(out)
}

fn split(line: usize, text: &str) -> Result<Instruction, Failure> {
    let (kw, mut rest) = match text.split_once(char::is_whitespace) {
        Some((k, r)) => (k, r.trim_start()),
        None => (text, ""),
    };
    let keyword = kw.to_ascii_uppercase();
    if !SUPPORTED.contains(&keyword.as_str()) {
        if KNOWN_UNSUPPORTED.contains(&keyword.as_str()) {
            return Err(unsupported(line, format!("{keyword} is not supported")));
        }
        return Err(invalid(line, format!("unknown instruction {kw:?}")));
    }
    let mut flags = Vec::new();
    // Flags come first and are `--name=value` (or a bare `--name`).
    if matches!(
        keyword.as_str(),
        "FROM" | "RUN" | "COPY" | "ADD" | "HEALTHCHECK"
    ) {
        while let Some(f) = rest.strip_prefix("--") {
            let (word, after) = match f.split_once(char::is_whitespace) {
                Some((w, a)) => (w, a.trim_start()),
                None => (f, ""),
            };
            let (name, value) = match word.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (word.to_string(), String::new()),
            };
            if name.is_empty() {
                return Err(invalid(line, format!("{keyword} has an empty flag")));
            }
            flags.push((name, value));
            rest = after;
        }
    }
    if rest.is_empty() && keyword != "RUN" {
        return Err(invalid(line, format!("{keyword} needs arguments")));
    }
    // A heredoc (`RUN <<EOF`) would make the lines after it part of this
    // instruction; refused here rather than misread as instructions.
    if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") && has_heredoc(rest) {
        return Err(unsupported(
            line,
            format!("{keyword} with a heredoc (<<EOF); put the script in a file and COPY it, or join the lines with \\"),
        ));
    }
    Ok(Instruction {
        line,
        keyword,
        flags,
        args: rest.to_string(),
    })
}

/// Whether `s` holds a Dockerfile heredoc marker, a word starting with
/// `<<WORD`, `<<-WORD`, `<<"WORD"` or `<<'WORD'` (a shell's `<<<`
/// here-string is not one).
fn has_heredoc(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len().saturating_sub(2)).any(|i| {
        // Only a word that starts with `<<` (as BuildKit reads them).
        if &b[i..i + 2] != b"<<" || (i > 0 && !b[i - 1].is_ascii_whitespace()) {
            return false;
        }
        let mut j = i + 2;
        if b.get(j) == Some(&b'-') {
            j += 1;
        }
        if matches!(b.get(j), Some(b'"' | b'\'')) {
            j += 1;
        }
        matches!(b.get(j), Some(c) if c.is_ascii_alphabetic() || *c == b'_')
    })
}

/// The variables substitution sees: build args in scope and the
/// environment so far (the environment wins, as in Docker).
pub type Vars = BTreeMap<String, String>;

/// Split `s` into words as Docker does for ENV, LABEL, COPY and friends:
/// whitespace separates words outside quotes; quotes group and are
/// removed; `\` escapes the next character (not inside single quotes);
/// `$` substitutes (not inside single quotes).
pub fn words(s: &str, vars: &Vars, line: usize) -> Result<Vec<String>, Failure> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    // A word that is only unquoted expansions and came out empty is no
    // word at all (as in a shell); `""` is one.
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word && (quoted || !cur.is_empty()) {
                    out.push(std::mem::take(&mut cur));
                }
                in_word = false;
                quoted = false;
            }
            '\'' => {
                in_word = true;
                quoted = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(invalid(line, "an unterminated single quote")),
                    }
                }
            }
            '"' => {
                in_word = true;
                quoted = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(invalid(line, "an unterminated double quote")),
                        },
                        Some('$') => cur.push_str(&dollar(&mut chars, vars, line)?),
                        Some(c) => cur.push(c),
                        None => return Err(invalid(line, "an unterminated double quote")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '$' => {
                in_word = true;
                cur.push_str(&dollar(&mut chars, vars, line)?);
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word && (quoted || !cur.is_empty()) {
        out.push(cur);
    }
    Ok(out)
}

/// `s` with variables substituted but words kept together (WORKDIR, USER,
/// FROM take one word; quotes are still removed).
pub fn one_word(s: &str, vars: &Vars, line: usize, what: &str) -> Result<String, Failure> {
    let w = words(s, vars, line)?;
    match w.len() {
        1 => Ok(w.into_iter().next().unwrap_or_default()),
        0 => Err(invalid(line, format!("{what} is empty"))),
        _ => Err(invalid(line, format!("{what} must be one word, got {s:?}"))),
    }
}

/// After a `$`: the value it stands for.
fn dollar(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    vars: &Vars,
    line: usize,
) -> Result<String, Failure> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    match chars.peek().copied() {
        Some('{') => {
            chars.next();
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if !is_name(c) {
                    break;
                }
                name.push(c);
                chars.next();
            }
            if name.is_empty() {
                return Err(invalid(line, "an empty ${} substitution"));
            }
            match chars.next() {
                Some('}') => Ok(vars.get(&name).cloned().unwrap_or_default()),
                Some(':') => {
                    let op = chars.next();
                    let mut word = String::new();
                    let mut depth = 0;
                    loop {
                        match chars.next() {
                            Some('}') if depth == 0 => break,
                            Some(c) => {
                                if c == '{' {
                                    depth += 1;
                                } else if c == '}' {
                                    depth -= 1;
                                }
                                word.push(c);
                            }
                            None => return Err(invalid(line, format!("${{{name}:… is not closed"))),
                        }
                    }
                    // The word may itself hold variables.
                    let word = words(&word, vars, line)?.join(" ");
                    let set = vars.get(&name).filter(|v| !v.is_empty());
                    match op {
                        Some('-') => Ok(set.cloned().unwrap_or(word)),
                        Some('+') => Ok(if set.is_some() { word } else { String::new() }),
                        _ => Err(unsupported(
                            line,
                            format!("the substitution ${{{name}:{}…}} (only :- and :+)", op.unwrap_or(' ')),
                        )),
                    }
                }
                _ => Err(unsupported(
                    line,
                    format!("the substitution ${{{name}…}} (only ${{NAME}}, ${{NAME:-word}}, ${{NAME:+word}})"),
                )),
            }
        }
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if !is_name(c) {
                    break;
                }
                name.push(c);
                chars.next();
            }
            Ok(vars.get(&name).cloned().unwrap_or_default())
        }
        _ => Ok("$".into()),
    }
}

/// `KEY=VALUE …` pairs (ENV, LABEL, ARG's default); the legacy `KEY VALUE`
/// form (one pair, the rest of the line its value) when `legacy` is allowed
/// and the first word has no `=`.
pub fn pairs(
    s: &str,
    vars: &Vars,
    line: usize,
    what: &str,
) -> Result<Vec<(String, String)>, Failure> {
    let first = s.split_whitespace().next().unwrap_or_default();
    if !first.contains('=') {
        let (k, v) = match s.trim().split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => {
                return Err(invalid(
                    line,
                    format!("{what} {s:?} needs KEY=VALUE (or KEY VALUE)"),
                ))
            }
        };
        let key = one_word(k, vars, line, what)?;
        let value = words(v, vars, line)?.join(" ");
        return Ok(vec![(key, value)]);
    }
    let mut out = Vec::new();
    for w in words(s, vars, line)? {
        let Some((k, v)) = w.split_once('=') else {
            return Err(invalid(line, format!("{what} {w:?} is not KEY=VALUE")));
        };
        if k.is_empty() {
            return Err(invalid(line, format!("{what} {w:?} has no name")));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> Vars {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn continuations_comments_and_forms() {
        let text = "# syntax=docker/dockerfile:1\n\
                    FROM base AS build\n\
                    # a comment\n\
                    RUN apt-get update && \\\n\
                    # inside\n\
                        apt-get install -y curl\n\
                    \n\
                    copy --chown=1000:1000 a b /dst/\n\
                    CMD [\"sh\", \"-c\", \"echo hi\"]\n";
        let ins = parse(text).expect("parse");
        assert_eq!(ins.len(), 4);
        assert_eq!((ins[0].line, ins[0].keyword.as_str()), (2, "FROM"));
        assert_eq!(ins[0].args, "base AS build");
        assert_eq!(ins[1].line, 4);
        assert_eq!(ins[1].args, "apt-get update && apt-get install -y curl");
        assert_eq!(ins[2].keyword, "COPY");
        assert_eq!(ins[2].flags, vec![("chown".into(), "1000:1000".into())]);
        assert_eq!(ins[2].args, "a b /dst/");
        assert_eq!(
            ins[3].json_form(),
            Some(vec!["sh".into(), "-c".into(), "echo hi".into()])
        );
        assert_eq!(ins[1].json_form(), None);
    }

    #[test]
    fn outside_the_subset_names_the_instruction_and_line() {
        let e = parse("FROM x\nVOLUME /data\n").expect_err("refused");
        assert_eq!(e.code, ErrorCode::BuildInstructionUnsupported);
        assert!(
            e.message.contains("line 2") && e.message.contains("VOLUME"),
            "{}",
            e.message
        );
        let e = parse("FROM x\n\nFROBNICATE y\n").expect_err("refused");
        assert_eq!(e.code, ErrorCode::BuildDockerfileInvalid);
        assert!(e.message.contains("line 3") && e.message.contains("FROBNICATE"));
        for text in [
            "FROM x\nRUN <<EOF\necho hi\nEOF\n",
            "FROM x\nCOPY <<-'X' /a\nhi\nX\n",
        ] {
            let e = parse(text).expect_err("refused");
            assert_eq!(e.code, ErrorCode::BuildInstructionUnsupported, "{text}");
            assert!(
                e.message.contains("line 2") && e.message.contains("heredoc"),
                "{}",
                e.message
            );
        }
        assert!(parse("FROM x\nRUN cat <<< \"$x\" && echo a<<b\n").is_ok());
        let e = parse("# escape=`\nFROM x\n").expect_err("refused");
        assert_eq!(e.code, ErrorCode::BuildInstructionUnsupported);
        let e = parse("FROM x\nWORKDIR\n").expect_err("refused");
        assert!(e.message.contains("line 2"), "{}", e.message);
        assert!(parse(&"#".repeat(MAX_BYTES + 1)).is_err());
    }

    #[test]
    fn words_quote_escape_and_substitute() {
        let v = vars(&[("A", "one"), ("E", ""), ("SP", "x y")]);
        let w = |s: &str| words(s, &v, 1).expect("words");
        assert_eq!(w("a b  c"), ["a", "b", "c"]);
        assert_eq!(w("'$A b' \"$A b\" $A"), ["$A b", "one b", "one"]);
        assert_eq!(
            w("${A}x ${E:-dflt} ${A:-dflt} ${A:+alt} ${E:+alt}"),
            ["onex", "dflt", "one", "alt"]
        );
        assert_eq!(w("${MISSING:-${A}2}"), ["one2"]);
        assert_eq!(w("a\\ b \\$A \"q\\\"q\""), ["a b", "$A", "q\"q"]);
        assert_eq!(w("$SP"), ["x y"]);
        assert_eq!(w("a $E b \"\" ''"), ["a", "b", "", ""]);
        assert_eq!(w("cost$ 5"), ["cost$", "5"]);
        assert!(words("'open", &v, 1).is_err());
        assert!(words("${A", &v, 1).is_err());
        assert_eq!(
            words("${A/x/y}", &v, 4).expect_err("refused").code,
            ErrorCode::BuildInstructionUnsupported
        );
    }

    #[test]
    fn pairs_both_forms() {
        let v = vars(&[("HOME", "/root")]);
        assert_eq!(
            pairs("A=1 B=\"two words\" C=$HOME/x", &v, 1, "ENV").expect("pairs"),
            [
                ("A".to_string(), "1".to_string()),
                ("B".into(), "two words".into()),
                ("C".into(), "/root/x".into())
            ]
        );
        assert_eq!(
            pairs("PATH_EXTRA /opt/bin  /usr/x", &v, 1, "ENV").expect("legacy"),
            [("PATH_EXTRA".to_string(), "/opt/bin /usr/x".to_string())]
        );
        assert!(pairs("A=1 =2", &v, 1, "ENV").is_err());
        assert!(pairs("LONELY", &v, 1, "ENV").is_err());
    }
}
