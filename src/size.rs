//! The one parser of size arguments: `--size` is HxW for `inspect`, `graph`, `profile` and the
//! recipe commands (latent positions), WxH for `run` (pixels, as diffusers' width/height), and
//! `--original-size`/`--target-size` are WxH; `--crop-top-left` (TOP,LEFT) shares the splitting.
//! Every error names the flag and says what was expected.
//!
//! Try it: `cargo run --release -- inspect models/tiny-sd --size 8x0` (refused: sizes must be
//! positive).

use std::num::ParseIntError;

/// Which number a size argument gives first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Height then width (latent positions, e.g. `64x64`); both must be positive.
    HxW,
    /// Width then height (pixels, e.g. `512x512`).
    WxH,
}

impl Order {
    fn expected(self) -> &'static str {
        match self {
            Order::HxW => "HxW, e.g. 64x64",
            Order::WxH => "WxH, e.g. 512x512",
        }
    }
}

/// A size argument that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    /// No separator between the two numbers.
    #[error("{flag} {text}: expected {expected}")]
    Form {
        flag: String,
        text: String,
        expected: &'static str,
    },
    /// A side of an HxW size is not a whole number.
    #[error("{flag} {text}: bad {side}")]
    Side {
        flag: String,
        text: String,
        side: &'static str,
        #[source]
        source: ParseIntError,
    },
    /// A number of a WxH size or a pair is not a whole number.
    #[error("{flag} {text}: {value:?} is not a whole number (expected {expected})")]
    Number {
        flag: String,
        text: String,
        value: String,
        expected: &'static str,
        #[source]
        source: ParseIntError,
    },
    /// An HxW size with a zero side.
    #[error("{flag} {text}: sizes must be positive")]
    Zero { flag: String, text: String },
}

/// The two numbers of `text`, in the order they are written (`(h, w)` for [`Order::HxW`],
/// `(w, h)` for [`Order::WxH`]); `x` and `X` separate them.
pub fn parse(flag: &str, text: &str, order: Order) -> Result<(usize, usize), SizeError> {
    let expected = order.expected();
    let (a, b) = split(flag, text, 'x', expected)?;
    match order {
        Order::HxW => {
            let side = |v: &str, side: &'static str| {
                v.trim().parse::<usize>().map_err(|source| SizeError::Side {
                    flag: flag.into(),
                    text: text.into(),
                    side,
                    source,
                })
            };
            let (h, w) = (side(a, "height")?, side(b, "width")?);
            if h == 0 || w == 0 {
                return Err(SizeError::Zero {
                    flag: flag.into(),
                    text: text.into(),
                });
            }
            Ok((h, w))
        }
        Order::WxH => Ok((
            number(flag, text, a, expected)?,
            number(flag, text, b, expected)?,
        )),
    }
}

/// A corner `TOP,LEFT` in pixels (`--crop-top-left`).
pub fn corner(flag: &str, text: &str) -> Result<(usize, usize), SizeError> {
    let expected = "TOP,LEFT, e.g. 0,0";
    let (a, b) = split(flag, text, ',', expected)?;
    Ok((
        number(flag, text, a, expected)?,
        number(flag, text, b, expected)?,
    ))
}

/// `text` split at its first `sep` (`x` also accepts `X`).
fn split<'t>(
    flag: &str,
    text: &'t str,
    sep: char,
    expected: &'static str,
) -> Result<(&'t str, &'t str), SizeError> {
    text.split_once(|c: char| c == sep || (sep == 'x' && c == 'X'))
        .ok_or_else(|| SizeError::Form {
            flag: flag.into(),
            text: text.into(),
            expected,
        })
}

fn number(flag: &str, text: &str, v: &str, expected: &'static str) -> Result<usize, SizeError> {
    v.trim().parse().map_err(|source| SizeError::Number {
        flag: flag.into(),
        text: text.into(),
        value: v.into(),
        expected,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_orders_and_their_errors() {
        assert_eq!(parse("--size", "8x16", Order::HxW).unwrap(), (8, 16));
        assert_eq!(parse("--size", "512X768", Order::WxH).unwrap(), (512, 768));
        assert_eq!(corner("--crop-top-left", "8, 16").unwrap(), (8, 16));
        let e = parse("--size", "8", Order::HxW).unwrap_err().to_string();
        assert_eq!(e, "--size 8: expected HxW, e.g. 64x64");
        let e = parse("--size", "0x8", Order::HxW).unwrap_err().to_string();
        assert_eq!(e, "--size 0x8: sizes must be positive");
        let e = parse("--size", "ax8", Order::HxW).unwrap_err().to_string();
        assert_eq!(e, "--size ax8: bad height");
        assert_eq!(parse("--size", "0x8", Order::WxH).unwrap(), (0, 8));
        let e = parse("--target-size", "8xq", Order::WxH)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--target-size 8xq: \"q\" is not a whole number (expected WxH, e.g. 512x512)"
        );
        let e = corner("--crop-top-left", "8x16").unwrap_err().to_string();
        assert_eq!(e, "--crop-top-left 8x16: expected TOP,LEFT, e.g. 0,0");
    }
}
