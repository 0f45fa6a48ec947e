//! CLIP text side of a Stable Diffusion pipeline: the BPE tokenizer (`tokenizer/`) and the text
//! encoder (`text_encoder/`), named as transformers names them.
//!
//! Try it: `rewire run models/tiny-sd --prompt "a photo of a cat" -o out.png`.

pub mod text_encoder;
pub mod tokenizer;
