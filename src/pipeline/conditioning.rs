//! The run's text as the UNet's conditioning: the prompts (and negatives, for guidance)
//! through the text encoder; on SDXL also through the second encoder (`text_encoder_2/`), its
//! pooled `text_embeds` and the size conditioning as `time_ids`. Also the prompts a text
//! encoder cuts off, and the check that a recipe's words sit at the same token positions for
//! both tokenizers.
//!
//! Try it: `cargo test --release --test sdxl sdxl_conditioning_and_unet_match_diffusers`.

use super::{Pipeline, PipelineError, RunOptions, component};
use crate::clip::text_encoder::{TextEncoder, TextOutput};
use crate::clip::tokenizer::Tokenizer;
use crate::exec::{HostTensor, Value};
use crate::recipe::Source;
use std::collections::HashMap;

/// SDXL's second text encoder (`CLIPTextModelWithProjection`) with its tokenizer.
pub struct SecondEncoder {
    pub tokenizer: Tokenizer,
    pub text: TextEncoder,
    /// model_index.json's `force_zeros_for_empty_prompt` (diffusers' default: true): with no
    /// negative prompt, the unconditional embeddings are zeros instead of the encoded "".
    pub force_zeros_for_empty_prompt: bool,
}

/// The UNet's text conditioning for a run, batch `[negatives, prompts]`.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `encoder_hidden_states` `[batch, text_len, cross_attention_dim]`.
    pub encoder_hidden_states: HostTensor,
    /// SDXL: `text_embeds` `[batch, pooled]` and `time_ids` `[batch, 6]`.
    pub text_time: Option<(HostTensor, HostTensor)>,
}

impl Conditioning {
    /// The run's constants as UNet inputs: `encoder_hidden_states` (and SDXL's `text_embeds`,
    /// `time_ids`).
    pub fn constants(&self) -> HashMap<String, HostTensor> {
        let mut inputs = HashMap::new();
        inputs.insert(
            "encoder_hidden_states".to_string(),
            self.encoder_hidden_states.clone(),
        );
        if let Some((text_embeds, time_ids)) = &self.text_time {
            inputs.insert("text_embeds".to_string(), text_embeds.clone());
            inputs.insert("time_ids".to_string(), time_ids.clone());
        }
        inputs
    }

    /// One UNet call's inputs: the constants, `sample` and `timestep` `t`.
    pub fn unet_inputs(&self, sample: HostTensor, t: f64) -> HashMap<String, HostTensor> {
        let mut inputs = self.constants();
        inputs.insert("sample".to_string(), sample);
        inputs.insert(
            "timestep".to_string(),
            HostTensor::new(vec![1], vec![t as f32]),
        );
        inputs
    }
}

impl Pipeline {
    /// Prompts longer than their text encoder reads, as warnings to print: which prompt, its
    /// token count, the limit and the words cut off (diffusers truncates them the same way).
    pub fn truncations(&self, opts: &RunOptions) -> Vec<String> {
        let mut texts: Vec<(&str, &Tokenizer, &str)> = Vec::new();
        for p in &opts.prompts {
            texts.push(("prompt", &self.tokenizer, p));
        }
        if let Some(n) = &opts.negative {
            texts.push(("negative prompt", &self.tokenizer, n));
        }
        if let Some(second) = &self.second {
            for p in &opts.sdxl.prompts_2 {
                texts.push(("second prompt", &second.tokenizer, p));
            }
            if let Some(n) = &opts.sdxl.negative_2 {
                texts.push(("second negative prompt", &second.tokenizer, n));
            }
        }
        texts
            .into_iter()
            .filter_map(|(what, tok, text)| {
                let (n, cut) = tok.truncation(text)?;
                let mut shown: String = cut.chars().take(60).collect();
                if shown.len() < cut.len() {
                    shown.push('…');
                }
                Some(format!(
                    "the {what} has {n} tokens, the text encoder reads {}: cut off: {shown:?}",
                    tok.max_length()
                ))
            })
            .collect()
    }

    /// The prompts for the second encoder, one per prompt (diffusers: `prompt_2 or prompt`).
    pub(super) fn prompts_2(&self, opts: &RunOptions) -> Result<Vec<String>, PipelineError> {
        let p2 = &opts.sdxl.prompts_2;
        match p2.len() {
            0 => Ok(opts.prompts.clone()),
            1 => Ok(vec![p2[0].clone(); opts.prompts.len()]),
            n if n == opts.prompts.len() => Ok(p2.clone()),
            n => Err(PipelineError::Prompts2 {
                count: n,
                prompts: opts.prompts.len(),
            }),
        }
    }

    /// Encodes the run's text as the UNet's conditioning, batch `[negative × P, prompts]`
    /// (only the prompts without guidance). SD 1.x/2.x: the encoder's `last_hidden_state`.
    /// SDXL (as diffusers' `encode_prompt`): both encoders' `hidden_states[-2]` concatenated,
    /// the second's pooled `text_embeds`, and the size conditioning as `time_ids`; with no
    /// negative prompt and `force_zeros_for_empty_prompt`, zeros for the negatives.
    pub fn conditioning(
        &self,
        opts: &RunOptions,
        size: (usize, usize),
    ) -> Result<Conditioning, PipelineError> {
        let p = opts.prompts.len();
        if p == 0 {
            return Err(PipelineError::NoPrompt);
        }
        let cfg = opts.guidance > 1.0;
        let Some(second) = &self.second else {
            if let Some(option) = opts.sdxl.first_set() {
                return Err(PipelineError::NotSdxl {
                    option,
                    path: self.dir.clone(),
                });
            }
            let mut ids: Vec<Vec<u32>> = Vec::new();
            if cfg {
                let neg = self
                    .tokenizer
                    .encode(opts.negative.as_deref().unwrap_or(""));
                ids.extend(std::iter::repeat_n(neg, p));
            }
            for prompt in &opts.prompts {
                ids.push(self.tokenizer.encode(prompt));
            }
            let out = self
                .text
                .try_encode(&ids)
                .map_err(component("text_encoder"))?;
            return Ok(Conditioning {
                encoder_hidden_states: Value::R3(out).to_host(),
                text_time: None,
            });
        };
        let prompts_2 = self.prompts_2(opts)?;
        let encode = |first: &[&str], second_p: &[&str]| -> Result<_, PipelineError> {
            let ids1: Vec<Vec<u32>> = first.iter().map(|t| self.tokenizer.encode(t)).collect();
            let ids2: Vec<Vec<u32>> = second_p
                .iter()
                .map(|t| second.tokenizer.encode(t))
                .collect();
            let a: TextOutput = self
                .text
                .encode_all(&ids1)
                .map_err(component("text_encoder"))?;
            let b: TextOutput = second
                .text
                .encode_all(&ids2)
                .map_err(component("text_encoder_2"))?;
            let states = burn::tensor::Tensor::cat(vec![a.penultimate, b.penultimate], 2);
            let pooled = b
                .pooled
                .expect("checked at open: text_encoder_2 has a projection");
            Ok((Value::R3(states).to_host(), Value::R2(pooled).to_host()))
        };
        let prompts: Vec<&str> = opts.prompts.iter().map(String::as_str).collect();
        let prompts_2: Vec<&str> = prompts_2.iter().map(String::as_str).collect();
        let (mut states, mut pooled) = encode(&prompts, &prompts_2)?;
        if cfg {
            let (neg_states, neg_pooled) =
                if opts.negative.is_none() && second.force_zeros_for_empty_prompt {
                    (
                        HostTensor::new(states.shape.clone(), vec![0.0; states.data.len()]),
                        HostTensor::new(pooled.shape.clone(), vec![0.0; pooled.data.len()]),
                    )
                } else {
                    // diffusers: negative_prompt or "", negative_prompt_2 or negative_prompt.
                    let neg = opts.negative.as_deref().unwrap_or("");
                    let neg_2 = match opts.sdxl.negative_2.as_deref() {
                        Some(n) if !n.is_empty() => n,
                        _ => neg,
                    };
                    encode(&vec![neg; p], &vec![neg_2; p])?
                };
            states = concat0(&neg_states, &states);
            pooled = concat0(&neg_pooled, &pooled);
        }
        let (w, h) = size;
        let (ow, oh) = opts.sdxl.original_size.unwrap_or((w, h));
        let (tw, th) = opts.sdxl.target_size.unwrap_or((w, h));
        let (top, left) = opts.sdxl.crop_top_left;
        let row = [oh, ow, top, left, th, tw].map(|v| v as f32);
        let batch = pooled.shape[0];
        let time_ids = HostTensor::new(vec![batch, 6], row.repeat(batch));
        let expected = self.unet.resolved.text_time.as_ref().map(|tt| {
            tt.input_dim
                .saturating_sub(time_ids.shape[1] * tt.time_embed_dim)
        });
        if let Some(expected) = expected
            && expected != pooled.shape[1]
        {
            return Err(PipelineError::Conditioning {
                what: "text_embeds (text_encoder_2's projection_dim)",
                expected,
                found: pooled.shape[1],
            });
        }
        Ok(Conditioning {
            encoder_hidden_states: states,
            text_time: Some((pooled, time_ids)),
        })
    }
}

/// SDXL: a recipe's words bind to the first tokenizer's tokens of the last prompt; the UNet's
/// text states at those positions also hold the second encoder's states of the last
/// `prompt_2`, so a word must sit at the same positions there (it does when both prompts are
/// the same and the tokenizers share a vocabulary, as SDXL's do).
pub(super) fn check_words_2(
    src: &Source,
    first: &HashMap<String, Vec<usize>>,
    second: &HashMap<String, Vec<usize>>,
) -> Result<(), PipelineError> {
    use crate::recipe::spans::Seg;
    use crate::recipe::{RewriteOp, at};
    for (i, r) in src.recipe.rewrites.iter().enumerate() {
        let RewriteOp::Reweight { words, .. } = &r.op else {
            continue;
        };
        for word in words.keys() {
            let (Some(a), b) = (first.get(word), second.get(word)) else {
                continue; // not in the prompt: the compiler says so
            };
            if b != Some(a) {
                let path = at(
                    i,
                    &[
                        Seg::Field("op"),
                        Seg::Field("words"),
                        Seg::Key(word.clone()),
                    ],
                );
                let found = match b {
                    Some(b) => format!("at token positions {b:?}"),
                    None => "nowhere".into(),
                };
                return Err(crate::compile::CompileError::from(src.error(
                    &path,
                    "word-tokenizers",
                    format!(
                        "word \"{word}\" is at token positions {a:?} for the first tokenizer and {found} in the second prompt (tokenizer_2)"
                    ),
                    "words bind to the first tokenizer's tokens, and the UNet's text states at those positions also hold text_encoder_2's states: give --prompt-2 the word at the same place (or leave --prompt-2 out), or reweight by tokens: {POSITION: WEIGHT}",
                ))
                .into());
            }
        }
    }
    Ok(())
}

/// Two host tensors joined on the first axis.
fn concat0(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let mut shape = a.shape.clone();
    shape[0] += b.shape[0];
    let mut data = a.data.clone();
    data.extend_from_slice(&b.data);
    HostTensor::new(shape, data)
}
