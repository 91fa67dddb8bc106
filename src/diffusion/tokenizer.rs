//! The CLIP BPE tokenizer that turns a prompt into the 77 token ids every Stable-Diffusion-family text encoder reads.
//!
//! The tokenizer is the HuggingFace `tokenizers` pipeline of openai/clip-vit-large-patch14 (NFC + whitespace collapse +
//! lowercase, CLIP's word regex, byte-level BPE with `</w>` word ends). It can come from the copy embedded in the
//! binary (`models/clip-tokenizer`, built by `tools/build_clip_tokenizer.py`), from a model folder's
//! `tokenizer.json`, or from the `vocab.json` + `merges.txt` pair that diffusers model folders ship.
//!
//! Privacy: prompts are user content. The BPE word cache of `tokenizers` is disabled (see `pipeline::cacheless_bpe`) so
//! no prompt word outlives the call that tokenized it, and no `Debug` output here contains token ids.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use tokenizers::Tokenizer;

use super::{Error, Result};
use pipeline::{
    clip_pipeline, parse_merges, take_json_merges, tokenizer_merges, without_word_cache, END_OF_TEXT, START_OF_TEXT,
};

mod pipeline;

/// Sequence length of every CLIP text encoder: BOS + up to 75 prompt tokens + EOS, padded.
pub const CLIP_MAX_TOKENS: usize = 77;

/// The tokenizer.json shipped in `models/clip-tokenizer`, embedded in the binary so no download is needed.
pub const EMBEDDED_CLIP_TOKENIZER_JSON: &[u8] = include_bytes!("../../models/clip-tokenizer/tokenizer.json");

/// First line of a merges.txt; `tokenizers` and transformers skip it.
const MERGES_HEADER: &str = "#version: 0.2";
/// Prompt tokens that fit between BOS and EOS.
const MAX_PROMPT_TOKENS: usize = CLIP_MAX_TOKENS - 2;

/// A CLIP tokenizer; cheap to share between threads (`&self` everywhere).
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    start_of_text_id: u32,
    end_of_text_id: u32,
}

/// A prompt encoded for a CLIP text encoder.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// BOS, the prompt tokens, EOS, then padding: always [`CLIP_MAX_TOKENS`] long.
    pub ids: Vec<u32>,
    /// How many prompt tokens did not fit and were dropped (0 when the prompt fit).
    pub truncated_tokens: usize,
    /// Where the text encoder pools: the first position of the largest id, as transformers' CLIP text model does
    /// (`argmax` over ids). That is the EOS appended here unless the prompt itself spells `<|endoftext|>`.
    pub eos_position: usize,
}

// Ids can be decoded back to the prompt, so they stay out of logs.
impl fmt::Debug for TokenizedPrompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenizedPrompt")
            .field("ids", &format_args!("[{} ids]", self.ids.len()))
            .field("truncated_tokens", &self.truncated_tokens)
            .field("eos_position", &self.eos_position)
            .finish()
    }
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("start_of_text_id", &self.start_of_text_id)
            .field("end_of_text_id", &self.end_of_text_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// The tokenizer embedded in the binary ([`EMBEDDED_CLIP_TOKENIZER_JSON`]).
    pub fn embedded() -> Result<Self> {
        Self::from_json_bytes(EMBEDDED_CLIP_TOKENIZER_JSON, "embedded CLIP tokenizer")
    }

    /// Loads a `tokenizers` tokenizer.json, e.g. a model folder's `tokenizer/tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| tokenizer_error(path.display(), e))?;
        Self::from_json_bytes(&bytes, &path.display().to_string())
    }

    /// Builds CLIP's pipeline around a transformers-style `vocab.json` (token → id) and `merges.txt` (one
    /// `left right` pair per line, ranked by line, after an optional `#version` header), as diffusers model folders
    /// ship them in `tokenizer/` and `tokenizer_2/`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let vocab_text = std::fs::read_to_string(vocab).map_err(|e| tokenizer_error(vocab.display(), e))?;
        let vocab_map: HashMap<String, u32> = serde_json::from_str(&vocab_text)
            .map_err(|e| tokenizer_error(vocab.display(), format!("not a JSON object of token ids: {e}")))?;
        for special in [START_OF_TEXT, END_OF_TEXT] {
            if !vocab_map.contains_key(special) {
                return Err(tokenizer_error(vocab.display(), format!("no {special} token")));
            }
        }
        let merges_text = std::fs::read_to_string(merges).map_err(|e| tokenizer_error(merges.display(), e))?;
        let merge_pairs = parse_merges(&merges_text).map_err(|message| tokenizer_error(merges.display(), message))?;
        let tokenizer = clip_pipeline(vocab_map.into_iter().collect(), merge_pairs)
            .map_err(|message| tokenizer_error(format_args!("{} + {}", vocab.display(), merges.display()), message))?;
        Self::from_pipeline(tokenizer).map_err(|message| tokenizer_error(vocab.display(), message))
    }

    fn from_json_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let mut document: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| tokenizer_error(source, e))?;
        let merges = take_json_merges(&mut document).map_err(|message| tokenizer_error(source, message))?;
        let tokenizer: Tokenizer = serde_json::from_value(document).map_err(|e| tokenizer_error(source, e))?;
        let tokenizer = without_word_cache(tokenizer, merges).map_err(|message| tokenizer_error(source, message))?;
        Self::from_pipeline(tokenizer).map_err(|message| tokenizer_error(source, message))
    }

    fn from_pipeline(mut tokenizer: Tokenizer) -> std::result::Result<Self, String> {
        // Padding and truncation are done by `encode` with CLIP's fixed layout; a file's own settings must not
        // interfere.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| e.to_string())?;
        let id_of = |token: &str| tokenizer.token_to_id(token).ok_or_else(|| format!("no {token} token"));
        let start_of_text_id = id_of(START_OF_TEXT)?;
        let end_of_text_id = id_of(END_OF_TEXT)?;
        Ok(Self { tokenizer, start_of_text_id, end_of_text_id })
    }

    /// Encodes `prompt` as BOS + prompt tokens + EOS, padded with `pad_id` to [`CLIP_MAX_TOKENS`]. Prompts longer
    /// than 75 tokens keep their first 75 and report the rest in `truncated_tokens`.
    ///
    /// `pad_id`: SD1.x / SDXL text_encoder pad with `<|endoftext|>` (49407); SD2.x and SDXL's text_encoder_2 pad
    /// with "!" (id 0).
    pub fn encode(&self, prompt: &str, pad_id: u32) -> Result<TokenizedPrompt> {
        if self.tokenizer.id_to_token(pad_id).is_none() {
            let vocab_size = self.tokenizer.get_vocab_size(true);
            return Err(Error::Tokenizer(format!("pad id {pad_id} is outside the vocabulary ({vocab_size} tokens)")));
        }
        // The errors `tokenizers` can raise here concern the vocabulary (e.g. a missing unknown token), not the
        // prompt, so passing their text on does not leak the prompt.
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::Tokenizer(format!("tokenizing the prompt failed: {e}")))?;
        let prompt_ids = encoding.get_ids();
        let kept = prompt_ids.len().min(MAX_PROMPT_TOKENS);

        let mut ids = Vec::with_capacity(CLIP_MAX_TOKENS);
        ids.push(self.start_of_text_id);
        ids.extend_from_slice(&prompt_ids[..kept]);
        ids.push(self.end_of_text_id);
        ids.resize(CLIP_MAX_TOKENS, pad_id);
        let eos_position = first_position_of_largest(&ids);
        Ok(TokenizedPrompt { ids, truncated_tokens: prompt_ids.len() - kept, eos_position })
    }

    /// The id of `token` (a vocabulary entry such as `"!"` or `"<|endoftext|>"`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The vocabulary as transformers' `vocab.json` (a JSON object of token → id, in id order).
    pub fn vocab_json(&self) -> Result<String> {
        let mut entries: Vec<(String, u32)> = self.tokenizer.get_vocab(false).into_iter().collect();
        entries.sort_unstable_by_key(|(_, id)| *id);
        let mut json = String::from("{");
        for (index, (token, id)) in entries.iter().enumerate() {
            let key = serde_json::to_string(token).map_err(|e| Error::Tokenizer(format!("vocab.json: {e}")))?;
            let separator = if index == 0 { "" } else { ", " };
            json.push_str(&format!("{separator}{key}: {id}"));
        }
        json.push('}');
        Ok(json)
    }

    /// The merges as transformers' `merges.txt`: the `#version` header, then one `left right` pair per line by rank.
    pub fn merges_txt(&self) -> Result<String> {
        let merges = tokenizer_merges(&self.tokenizer).map_err(Error::Tokenizer)?;
        let mut text = format!("{MERGES_HEADER}\n");
        for (left, right) in &merges {
            // The text format separates the pair by a space and merges by newlines, so neither may occur inside.
            if [left, right].iter().any(|symbol| symbol.contains([' ', '\n', '\r'])) {
                return Err(Error::Tokenizer(format!(
                    "merge {left:?} + {right:?} contains whitespace and cannot be written to merges.txt"
                )));
            }
            text.push_str(&format!("{left} {right}\n"));
        }
        Ok(text)
    }
}

fn tokenizer_error(source: impl fmt::Display, message: impl fmt::Display) -> Error {
    Error::Tokenizer(format!("{source}: {message}"))
}

/// Index of the first occurrence of the largest id (`argmax`, which returns the first maximum).
fn first_position_of_largest(ids: &[u32]) -> usize {
    let mut best = 0;
    for (position, &id) in ids.iter().enumerate() {
        if id > ids[best] {
            best = position;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const END_OF_TEXT_ID: u32 = 49407;
    const EXCLAMATION_ID: u32 = 0;

    const ASTRONAUT: &str = "a photograph of an astronaut riding a horse";

    /// Prompts with punctuation, digits, apostrophes, whitespace runs, case, accents, scripts, emoji and spelled-out
    /// special tokens, with their ids from transformers 5.23 `CLIPTokenizerFast` on models/clip-tokenizer. OpenAI's
    /// simple_tokenizer.py gives the same ids for all of them; transformers' vocab.json + merges.txt loader for all
    /// but the upper-case `<|ENDOFTEXT|>`, which it matches case-sensitively.
    const TRANSFORMERS_IDS: &[(&str, &[u32])] = &[
        (ASTRONAUT, &[49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]),
        ("A PHOTOGRAPH OF AN ASTRONAUT RIDING A HORSE", &[49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]),
        ("multiple    spaces\tand\ttabs\nand\nnewlines", &[49406, 6470, 9006, 537, 29163, 537, 1218, 3418, 49407]),
        ("   leading and trailing spaces   ", &[49406, 3833, 537, 37427, 9006, 49407]),
        (
            "it's a dog's life, isn't it? they're here; we've won; I'm ok; we'll see; he'd go",
            &[
                49406, 585, 568, 320, 1929, 568, 970, 267, 2923, 713, 585, 286, 889, 982, 763, 282, 649, 1200, 1749,
                282, 328, 880, 2481, 282, 649, 1342, 862, 282, 797, 1896, 861, 49407,
            ],
        ),
        (
            "price: $1,234.56 (50% off) #1 @home",
            &[
                49406, 2827, 281, 259, 272, 267, 273, 274, 275, 269, 276, 277, 263, 276, 271, 260, 1007, 264, 258, 272,
                287, 1137, 49407,
            ],
        ),
        (
            "café crème brûlée, naïve façade, Ångström",
            &[
                49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 1097, 35689, 563, 778, 10067, 1928, 267,
                23176, 10352, 807, 7255, 332, 49407,
            ],
        ),
        (
            "東京の夜景、富士山",
            &[
                49406, 48338, 21078, 105, 21575, 23170, 250, 48132, 363, 45262, 161, 107, 234, 161, 96, 104, 46096,
                365, 49407,
            ],
        ),
        ("emoji 🐱🚀✨ 👩\u{200d}🚀 cat", &[49406, 16327, 35710, 22400, 3531, 26304, 13542, 2368, 49407]),
        (
            "e\u{301} combining accent vs \u{e9} precomposed",
            &[49406, 4166, 23561, 18931, 1547, 4166, 679, 19916, 49407],
        ),
        (
            "non\u{a0}breaking\u{2003}em space\u{3000}ideographic",
            &[49406, 3353, 2755, 2270, 2138, 1909, 78, 4245, 49407],
        ),
        ("a<|endoftext|>b", &[49406, 320, 49407, 321, 49407]),
        ("<|ENDOFTEXT|> uppercase special <|StartOfText|>", &[49406, 49407, 22465, 2068, 1689, 49406, 49407]),
    ];

    /// Loaded once: each load rebuilds the merge table, which dominates the test run time in debug builds.
    fn embedded() -> &'static ClipTokenizer {
        static EMBEDDED: std::sync::OnceLock<ClipTokenizer> = std::sync::OnceLock::new();
        EMBEDDED.get_or_init(|| ClipTokenizer::embedded().unwrap())
    }

    /// Writes the embedded tokenizer's vocab.json and merges.txt and loads them back.
    fn reloaded_from_vocab_merges(tokenizer: &ClipTokenizer) -> (tempfile::TempDir, ClipTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.json");
        let merges = dir.path().join("merges.txt");
        std::fs::write(&vocab, tokenizer.vocab_json().unwrap()).unwrap();
        std::fs::write(&merges, tokenizer.merges_txt().unwrap()).unwrap();
        let reloaded = ClipTokenizer::from_vocab_merges(&vocab, &merges).unwrap();
        (dir, reloaded)
    }

    fn padded(unpadded: &[u32], pad_id: u32) -> Vec<u32> {
        let mut ids = unpadded.to_vec();
        ids.resize(CLIP_MAX_TOKENS, pad_id);
        ids
    }

    #[test]
    fn astronaut_prompt_matches_transformers_ids_padded_with_end_of_text() {
        let encoded = embedded().encode(ASTRONAUT, END_OF_TEXT_ID).unwrap();
        let expected = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407];
        assert_eq!(encoded.ids, padded(&expected, END_OF_TEXT_ID));
        assert_eq!(encoded.truncated_tokens, 0);
        assert_eq!(encoded.eos_position, 9);
    }

    #[test]
    fn exclamation_padding_fills_after_eos_and_keeps_eos_position() {
        let encoded = embedded().encode(ASTRONAUT, EXCLAMATION_ID).unwrap();
        assert_eq!(encoded.ids.len(), CLIP_MAX_TOKENS);
        assert_eq!(encoded.ids[9], END_OF_TEXT_ID);
        assert!(encoded.ids[10..].iter().all(|&id| id == EXCLAMATION_ID));
        assert_eq!(encoded.eos_position, 9);
    }

    #[test]
    fn empty_prompt_is_bos_eos_then_padding() {
        let encoded = embedded().encode("", EXCLAMATION_ID).unwrap();
        assert_eq!(encoded.ids, padded(&[49406, 49407], EXCLAMATION_ID));
        assert_eq!(encoded.eos_position, 1);
    }

    #[test]
    fn prompts_match_transformers_ids() {
        let tokenizer = embedded();
        for (prompt, expected) in TRANSFORMERS_IDS {
            let encoded = tokenizer.encode(prompt, END_OF_TEXT_ID).unwrap();
            assert_eq!(encoded.ids, padded(expected, END_OF_TEXT_ID), "prompt {prompt:?}");
        }
    }

    #[test]
    fn spelled_out_end_of_text_moves_the_pooling_position_like_argmax() {
        let encoded = embedded().encode("a<|endoftext|>b", EXCLAMATION_ID).unwrap();
        assert_eq!(encoded.eos_position, 2);
    }

    #[test]
    fn long_prompt_keeps_bos_first_75_tokens_eos_and_counts_the_dropped_tokens() {
        let words: Vec<String> = (0..100).map(|i| format!("word{i}")).collect();
        let prompt = format!("a very long prompt {}", words.join(" "));
        let tokenizer = embedded();
        let encoded = tokenizer.encode(&prompt, END_OF_TEXT_ID).unwrap();
        // transformers (truncation=True, max_length=77): 294 prompt tokens; the kept head ends "… word26" + EOS.
        assert_eq!(encoded.truncated_tokens, 294 - 75);
        assert_eq!(&encoded.ids[..8], &[49406, 320, 1070, 1538, 20198, 2653, 271, 2653]);
        assert_eq!(&encoded.ids[72..], &[276, 2653, 273, 277, 49407]);
        assert_eq!(encoded.eos_position, 76);
    }

    #[test]
    fn truncation_starts_at_the_76th_prompt_token() {
        let tokenizer = embedded();
        let exactly_fitting = tokenizer.encode(&"a ".repeat(75), END_OF_TEXT_ID).unwrap();
        assert_eq!(exactly_fitting.truncated_tokens, 0);
        assert_eq!(exactly_fitting.ids[75], 320);
        let one_too_many = tokenizer.encode(&"a ".repeat(76), EXCLAMATION_ID).unwrap();
        assert_eq!(one_too_many.truncated_tokens, 1);
        assert_eq!(one_too_many.ids[76], END_OF_TEXT_ID);
    }

    #[test]
    fn pad_id_outside_the_vocabulary_is_rejected() {
        let error = embedded().encode("a cat", 49408).unwrap_err();
        assert!(matches!(&error, Error::Tokenizer(message) if message.contains("pad id 49408")), "{error}");
    }

    #[test]
    fn token_ids_of_padding_tokens() {
        let tokenizer = embedded();
        assert_eq!(tokenizer.token_id("!"), Some(EXCLAMATION_ID));
        assert_eq!(tokenizer.token_id("<|startoftext|>"), Some(49406));
        assert_eq!(tokenizer.token_id("<|endoftext|>"), Some(END_OF_TEXT_ID));
        assert_eq!(tokenizer.token_id("no-such-token"), None);
    }

    #[test]
    fn vocab_merges_pipeline_agrees_with_embedded_tokenizer_json() {
        let tokenizer = embedded();
        let (_dir, reloaded) = reloaded_from_vocab_merges(tokenizer);
        let long_prompt = "word ".repeat(90);
        let prompts = TRANSFORMERS_IDS.iter().map(|(prompt, _)| *prompt);
        for prompt in prompts.chain(["", long_prompt.as_str()]) {
            for pad_id in [END_OF_TEXT_ID, EXCLAMATION_ID] {
                assert_eq!(
                    tokenizer.encode(prompt, pad_id).unwrap(),
                    reloaded.encode(prompt, pad_id).unwrap(),
                    "{prompt:?}"
                );
            }
        }
    }

    #[test]
    fn vocab_json_and_merges_txt_round_trip_through_from_vocab_merges() {
        let tokenizer = embedded();
        let (_dir, reloaded) = reloaded_from_vocab_merges(tokenizer);
        assert_eq!(reloaded.vocab_json().unwrap(), tokenizer.vocab_json().unwrap());
        assert_eq!(reloaded.merges_txt().unwrap(), tokenizer.merges_txt().unwrap());
    }

    #[test]
    fn vocab_json_and_merges_txt_have_transformers_layout() {
        let tokenizer = embedded();
        let vocab: HashMap<String, u32> = serde_json::from_str(&tokenizer.vocab_json().unwrap()).unwrap();
        assert_eq!(vocab.len(), 49408);
        assert_eq!(vocab["!"], 0);
        // Byte symbols, then the same with </w>, then one token per merge ("i n" is the first), as CLIP lays them out.
        assert_eq!(vocab["!</w>"], 256);
        assert_eq!(vocab["in"], 512);
        assert_eq!(vocab["<|endoftext|>"], END_OF_TEXT_ID);
        let merges = tokenizer.merges_txt().unwrap();
        assert!(merges.starts_with("#version: 0.2\ni n\nt h\n"), "{}", &merges[..40]);
        assert_eq!(merges.lines().count(), 1 + 48894);
    }

    #[test]
    fn tokenizer_json_files_load_like_the_embedded_copy_with_either_merge_format() {
        // Hub files from 2021 (and ours) write merges as "left right"; `tokenizers` itself writes ["left", "right"].
        let pair_format = embedded().tokenizer.to_string(false).unwrap();
        assert!(pair_format.contains(r#"["i","n"]"#));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        for contents in [EMBEDDED_CLIP_TOKENIZER_JSON, pair_format.as_bytes()] {
            std::fs::write(&path, contents).unwrap();
            let from_file = ClipTokenizer::from_file(&path).unwrap();
            for (prompt, _) in TRANSFORMERS_IDS {
                assert_eq!(from_file.encode(prompt, 0).unwrap(), embedded().encode(prompt, 0).unwrap());
            }
        }
    }

    fn tokenizer_message(result: Result<ClipTokenizer>) -> String {
        match result {
            Err(Error::Tokenizer(message)) => message,
            other => panic!("expected a tokenizer error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_or_missing_files_are_tokenizer_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("tokenizer.json");
        std::fs::write(&broken, "{ not json").unwrap();
        assert!(tokenizer_message(ClipTokenizer::from_file(&broken)).contains("tokenizer.json"));
        let missing = dir.path().join("absent.json");
        assert!(tokenizer_message(ClipTokenizer::from_file(&missing)).contains("absent.json"));

        let vocab = dir.path().join("vocab.json");
        let merges = dir.path().join("merges.txt");
        std::fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
        std::fs::write(&merges, "#version: 0.2\na b\n").unwrap();
        let message = tokenizer_message(ClipTokenizer::from_vocab_merges(&vocab, &merges));
        assert!(message.contains("vocab.json") && message.contains("<|startoftext|>"), "{message}");

        std::fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2, "<|startoftext|>": 3, "<|endoftext|>": 4}"#).unwrap();
        std::fs::write(&merges, "#version: 0.2\na b\na b c\n").unwrap();
        let message = tokenizer_message(ClipTokenizer::from_vocab_merges(&vocab, &merges));
        assert!(message.contains("merges.txt") && message.contains("line 3"), "{message}");

        std::fs::write(&merges, "#version: 0.2\na c\n").unwrap();
        let message = tokenizer_message(ClipTokenizer::from_vocab_merges(&vocab, &merges));
        assert!(message.contains("merges.txt") && message.contains("invalid BPE model"), "{message}");
    }

    #[test]
    fn debug_output_does_not_reveal_token_ids() {
        let encoded = embedded().encode(ASTRONAUT, END_OF_TEXT_ID).unwrap();
        let debug = format!("{encoded:?}");
        assert!(!debug.contains("8853"), "{debug}");
        assert!(debug.contains("[77 ids]"), "{debug}");
    }
}
