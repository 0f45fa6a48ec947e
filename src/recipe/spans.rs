//! Source positions for recipe values. ron deserialises values without spans, so this module
//! re-reads the same text into a light tree of positions (structs, tuples, lists, maps, atoms)
//! that a semantic error can be located with: `rewrites[1].select.paths[0]` → line:column.

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone)]
enum Kind {
    /// `Name`, `Name(...)` or `(...)`: fields or items.
    Named {
        fields: Vec<(String, Node)>,
        items: Vec<Node>,
    },
    List(Vec<Node>),
    /// Entries as (key text, key node, value node).
    Map(Vec<(String, Node, Node)>),
    Atom(String),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    kind: Kind,
}

/// One step of a path into the tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Field(&'static str),
    Index(usize),
    /// A map entry's key, by its text as written (`2`, `"cat"` → `cat`).
    Key(String),
}

impl Node {
    /// The position of the value at `path`, or of the deepest value on the way that exists.
    pub fn locate(&self, path: &[Seg]) -> Pos {
        let mut node = self;
        for seg in path {
            match node.child(seg) {
                Some(n) => node = n,
                None => break,
            }
        }
        node.pos
    }

    /// Like [`Node::locate`] but `None` if any step is missing.
    pub fn find(&self, path: &[Seg]) -> Option<&Node> {
        let mut node = self;
        for seg in path {
            node = node.child(seg)?;
        }
        Some(node)
    }

    fn child(&self, seg: &Seg) -> Option<&Node> {
        match (&self.kind, seg) {
            (Kind::Named { fields, items }, Seg::Field(f)) => {
                if let Some((_, n)) = fields.iter().find(|(k, _)| k == f) {
                    return Some(n);
                }
                // Step through wrappers like `Some(...)` or an enum variant `Reweight(...)`.
                items.iter().find_map(|n| n.child(seg))
            }
            (Kind::Named { items, fields }, Seg::Index(i)) => {
                if let Some(n) = items.get(*i) {
                    Some(n)
                } else {
                    fields.first().and_then(|(_, n)| n.child(seg))
                }
            }
            (Kind::List(v), Seg::Index(i)) => v.get(*i),
            (Kind::Map(v), Seg::Key(k)) => v.iter().find(|(key, _, _)| key == k).map(|(_, n, _)| n),
            (Kind::Named { items, .. }, Seg::Key(_)) => items.iter().find_map(|n| n.child(seg)),
            _ => None,
        }
    }

    /// The atom's text (identifiers, numbers, strings without quotes).
    pub fn atom(&self) -> Option<&str> {
        match &self.kind {
            Kind::Atom(s) => Some(s),
            _ => None,
        }
    }
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
    line: usize,
    col: usize,
}

impl<'a> P<'a> {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }
    fn bump(&mut self) {
        if let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            if c == b'\n' {
                self.line += 1;
                self.col = 1;
            } else if c & 0xC0 != 0x80 {
                self.col += 1;
            }
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        loop {
            match self.peek() {
                Some(c) if c.is_ascii_whitespace() => self.bump(),
                Some(b'/') if self.s.get(self.i + 1) == Some(&b'/') => {
                    while !matches!(self.peek(), None | Some(b'\n')) {
                        self.bump();
                    }
                }
                Some(b'/') if self.s.get(self.i + 1) == Some(&b'*') => {
                    self.bump();
                    self.bump();
                    while self.peek().is_some()
                        && !(self.peek() == Some(b'*') && self.s.get(self.i + 1) == Some(&b'/'))
                    {
                        self.bump();
                    }
                    self.bump();
                    self.bump();
                }
                _ => break,
            }
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.bump();
            true
        } else {
            false
        }
    }
    fn ident(&mut self) -> String {
        let start = self.i;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || c == b'#')
        {
            self.bump();
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
    fn string(&mut self) -> String {
        self.bump(); // opening quote
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            if c == b'"' {
                self.bump();
                break;
            }
            if c == b'\\' {
                self.bump();
            }
            if let Some(c) = self.peek() {
                out.push(c);
            }
            self.bump();
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    fn value(&mut self, depth: usize) -> Option<Node> {
        self.ws();
        let pos = self.pos();
        if depth > 64 {
            return None;
        }
        let c = self.peek()?;
        let kind = match c {
            b'[' => {
                self.bump();
                let mut v = Vec::new();
                while !self.eat(b']') {
                    v.push(self.value(depth + 1)?);
                    self.eat(b',');
                }
                Kind::List(v)
            }
            b'{' => {
                self.bump();
                let mut v = Vec::new();
                while !self.eat(b'}') {
                    let k = self.value(depth + 1)?;
                    let key = k.atom().unwrap_or("").to_string();
                    if !self.eat(b':') {
                        return None;
                    }
                    let val = self.value(depth + 1)?;
                    v.push((key, k, val));
                    self.eat(b',');
                }
                Kind::Map(v)
            }
            b'(' => self.body(depth)?,
            b'"' => Kind::Atom(self.string()),
            b'\'' => {
                self.bump();
                let start = self.i;
                while !matches!(self.peek(), None | Some(b'\'')) {
                    self.bump();
                }
                let s = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.bump();
                Kind::Atom(s)
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let name = self.ident();
                if name == "r" || name.starts_with("r#") {
                    // raw strings are rare in recipes; treat as an atom up to the closing quote
                    while !matches!(self.peek(), None | Some(b'"')) {
                        self.bump();
                    }
                    Kind::Atom(self.string())
                } else {
                    self.ws();
                    if self.peek() == Some(b'(') {
                        self.body(depth)?
                    } else {
                        Kind::Atom(name)
                    }
                }
            }
            _ => {
                let start = self.i;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || b"+-._".contains(&c))
                {
                    self.bump();
                }
                if start == self.i {
                    return None;
                }
                Kind::Atom(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        };
        Some(Node { pos, kind })
    }
    /// `( field: value, ... )` or `( value, ... )`, starting at `(`.
    fn body(&mut self, depth: usize) -> Option<Kind> {
        self.bump();
        let mut fields = Vec::new();
        let mut items = Vec::new();
        while !self.eat(b')') {
            self.ws();
            let save = (self.i, self.line, self.col);
            if matches!(self.peek(), Some(c) if c.is_ascii_alphabetic() || c == b'_') {
                let name = self.ident();
                self.ws();
                if self.peek() == Some(b':') && self.s.get(self.i + 1) != Some(&b':') {
                    self.bump();
                    fields.push((name, self.value(depth + 1)?));
                    self.eat(b',');
                    continue;
                }
                (self.i, self.line, self.col) = save;
            }
            items.push(self.value(depth + 1)?);
            self.eat(b',');
        }
        Some(Kind::Named { fields, items })
    }
}

/// Parses RON text into a tree of positions; `None` if the text is not RON this reader follows
/// (then errors fall back to 1:1).
pub fn parse(text: &str) -> Option<Node> {
    let mut p = P {
        s: text.as_bytes(),
        i: 0,
        line: 1,
        col: 1,
    };
    // Skip `#![enable(...)]` attributes.
    p.ws();
    while p.peek() == Some(b'#') {
        while !matches!(p.peek(), None | Some(b'\n')) {
            p.bump();
        }
        p.ws();
    }
    p.value(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_values() {
        let text = "Recipe(\n  name: \"x\",\n  rewrites: [\n    Rewrite(\n      select: Select(paths: [\"a\", \"b\"]),\n      op: Reweight(tokens: {2: 2.5}),\n    ),\n  ],\n)\n";
        let t = parse(text).unwrap();
        let p = t.locate(&[
            Seg::Field("rewrites"),
            Seg::Index(0),
            Seg::Field("select"),
            Seg::Field("paths"),
            Seg::Index(1),
        ]);
        assert_eq!((p.line, p.col), (5, 35));
        let p = t.locate(&[
            Seg::Field("rewrites"),
            Seg::Index(0),
            Seg::Field("op"),
            Seg::Field("tokens"),
            Seg::Key("2".into()),
        ]);
        assert_eq!((p.line, p.col), (6, 29));
    }
}
