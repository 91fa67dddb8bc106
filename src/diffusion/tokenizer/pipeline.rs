//! Construction of CLIP's `tokenizers` pipeline for [`super::ClipTokenizer`]: parsing merges in both file formats,
//! building BPE models without a word cache, and assembling the full CLIP pipeline from a vocabulary and merges.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeBuilder, Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, ModelWrapper, SplitDelimiterBehavior, Tokenizer};

/// Marks the start of every encoded prompt (id 49406 in CLIP's vocabulary).
pub(super) const START_OF_TEXT: &str = "<|startoftext|>";
/// Marks the end of every encoded prompt (id 49407); also the unknown token and SD1.x's padding.
pub(super) const END_OF_TEXT: &str = "<|endoftext|>";
const END_OF_WORD_SUFFIX: &str = "</w>";
const NOT_BPE: &str = "the tokenizer model is not BPE, so it is not a CLIP tokenizer";
/// CLIP's word pattern (OpenAI's simple_tokenizer.py, minus the special-token alternatives: `tokenizers` cuts added
/// special tokens out before pre-tokenization, so they never reach the regex).
const CLIP_SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Parses merges.txt: an optional `#version` first line, then `left right` per line.
pub(super) fn parse_merges(text: &str) -> Result<Merges, String> {
    let mut merges = Merges::new();
    for (index, line) in text.lines().enumerate() {
        if (index == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            [left, right] if !left.is_empty() && !right.is_empty() => {
                merges.push((left.to_string(), right.to_string()))
            }
            _ => return Err(format!("line {}: expected two symbols separated by one space", index + 1)),
        }
    }
    Ok(merges)
}

/// Takes `model.merges` out of a parsed tokenizer.json, leaving an empty list.
///
/// `tokenizers` would otherwise build a BPE model with a word cache from them when it deserializes the document;
/// [`without_word_cache`] replaces that model anyway, so building its merge table would be wasted load time.
pub(super) fn take_json_merges(document: &mut serde_json::Value) -> Result<Merges, String> {
    let merges = document
        .get_mut("model")
        .and_then(|model| model.get_mut("merges"))
        .ok_or("no model.merges (not a BPE tokenizer)")?;
    parse_json_merges(std::mem::replace(merges, serde_json::Value::Array(Vec::new())))
}

/// Parses tokenizer.json's `model.merges`: either `"left right"` strings (older files, e.g. the hub's CLIP ones) or
/// `["left", "right"]` pairs (newer files).
fn parse_json_merges(merges: serde_json::Value) -> Result<Merges, String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum MergeEntry {
        Pair(String, String),
        Joined(String),
    }
    let entries: Vec<MergeEntry> =
        serde_json::from_value(merges).map_err(|e| format!("model.merges is not a list of merges: {e}"))?;
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| match entry {
            MergeEntry::Pair(left, right) => Ok((left, right)),
            MergeEntry::Joined(joined) => match joined.split(' ').collect::<Vec<_>>().as_slice() {
                [left, right] => Ok((left.to_string(), right.to_string())),
                _ => Err(format!("model.merges[{index}] is not two symbols separated by one space")),
            },
        })
        .collect()
}

/// The merges of the tokenizer's BPE model in rank order (the model keeps them only as a pair → rank map; its
/// serialization sorts them).
pub(super) fn tokenizer_merges(tokenizer: &Tokenizer) -> Result<Merges, String> {
    let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
        return Err(NOT_BPE.to_string());
    };
    let mut model = serde_json::to_value(bpe).map_err(|e| format!("cannot read the BPE merges: {e}"))?;
    serde_json::from_value(model["merges"].take()).map_err(|e| format!("cannot read the BPE merges: {e}"))
}

/// Builds a BPE model with the word cache turned off.
///
/// `tokenizers` keeps, by default, a cache of up to 10,000 tokenized words per BPE model in thread-local maps that
/// outlive the call (and even the model). Prompts must not persist in such a process-wide cache, so every model here
/// is built with capacity 0, which skips the cache entirely. The cost is small: measured on a 33-token prompt in a
/// release build, encoding takes about 73 µs without the cache against 50 µs with it, nothing next to a text-encoder
/// forward pass.
fn cacheless_bpe(
    vocab: Vocab,
    merges: Merges,
    configure: impl FnOnce(BpeBuilder) -> BpeBuilder,
) -> Result<BPE, String> {
    configure(BPE::builder().vocab_and_merges(vocab, merges))
        .cache_capacity(0)
        .build()
        .map_err(|e| format!("invalid BPE model: {e}"))
}

/// Replaces the BPE model of a deserialized tokenizer (whose cache has the default capacity, since tokenizer.json
/// cannot say otherwise) by the same model with `merges` and without a cache. See [`cacheless_bpe`].
pub(super) fn without_word_cache(mut tokenizer: Tokenizer, merges: Merges) -> Result<Tokenizer, String> {
    let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
        return Err(NOT_BPE.to_string());
    };
    let vocab: Vocab = bpe.get_vocab().into_iter().collect();
    let (dropout, unk_token) = (bpe.dropout, bpe.unk_token.clone());
    let (prefix, suffix) = (bpe.continuing_subword_prefix.clone(), bpe.end_of_word_suffix.clone());
    let (fuse_unk, byte_fallback, ignore_merges) = (bpe.fuse_unk, bpe.byte_fallback, bpe.ignore_merges);
    let rebuilt = cacheless_bpe(vocab, merges, |mut builder| {
        if let Some(p) = dropout {
            builder = builder.dropout(p);
        }
        if let Some(token) = unk_token {
            builder = builder.unk_token(token);
        }
        if let Some(prefix) = prefix {
            builder = builder.continuing_subword_prefix(prefix);
        }
        if let Some(suffix) = suffix {
            builder = builder.end_of_word_suffix(suffix);
        }
        builder.fuse_unk(fuse_unk).byte_fallback(byte_fallback).ignore_merges(ignore_merges)
    })?;
    tokenizer.with_model(rebuilt);
    Ok(tokenizer)
}

/// CLIP's full pipeline around `vocab` and `merges`, the same as models/clip-tokenizer/tokenizer.json describes.
pub(super) fn clip_pipeline(vocab: Vocab, merges: Merges) -> Result<Tokenizer, String> {
    let start_of_text_id = vocab.get(START_OF_TEXT).copied().ok_or_else(|| format!("no {START_OF_TEXT} token"))?;
    let end_of_text_id = vocab.get(END_OF_TEXT).copied().ok_or_else(|| format!("no {END_OF_TEXT} token"))?;
    let bpe = cacheless_bpe(vocab, merges, |builder| {
        builder
            .unk_token(END_OF_TEXT.to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD_SUFFIX.to_string())
    })?;

    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace_runs = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ").map_err(|e| e.to_string())?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![NFC.into(), whitespace_runs.into(), Lowercase.into()])))
        .map_err(|e| e.to_string())?;
    let clip_words =
        Split::new(SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_string()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        clip_words.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new(
            (END_OF_TEXT.to_string(), end_of_text_id),
            (START_OF_TEXT.to_string(), start_of_text_id),
        )
        .trim_offsets(false)
        .add_prefix_space(false),
    ));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // normalized: true as in openai/clip-vit-large-patch14 (so "<|EndOfText|>" matches after lowercasing, like
    // OpenAI's case-insensitive regex).
    let special = |content: &str| AddedToken::from(content, true).normalized(true);
    tokenizer.add_special_tokens([special(START_OF_TEXT), special(END_OF_TEXT)]).map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(left: &str, right: &str) -> (String, String) {
        (left.to_string(), right.to_string())
    }

    #[test]
    fn merges_txt_skips_the_version_header_and_blank_lines() {
        let merges = parse_merges("#version: 0.2\ni n\n\nt h\n").unwrap();
        assert_eq!(merges, vec![pair("i", "n"), pair("t", "h")]);
    }

    #[test]
    fn merges_txt_line_without_exactly_two_symbols_is_reported_by_line_number() {
        assert_eq!(
            parse_merges("#version: 0.2\ni n\nt h e\n").unwrap_err(),
            "line 3: expected two symbols separated by one space"
        );
        assert!(parse_merges("i  n").unwrap_err().starts_with("line 1:"));
    }

    #[test]
    fn json_merges_accept_joined_strings_and_pairs() {
        let joined = parse_json_merges(serde_json::json!(["i n", "t h"])).unwrap();
        let pairs = parse_json_merges(serde_json::json!([["i", "n"], ["t", "h"]])).unwrap();
        assert_eq!(joined, vec![pair("i", "n"), pair("t", "h")]);
        assert_eq!(pairs, joined);
    }

    #[test]
    fn taking_json_merges_leaves_an_empty_list() {
        let mut document = serde_json::json!({"model": {"type": "BPE", "merges": ["i n"]}});
        assert_eq!(take_json_merges(&mut document).unwrap(), vec![pair("i", "n")]);
        assert_eq!(document["model"]["merges"], serde_json::json!([]));
        let message = take_json_merges(&mut serde_json::json!({"model": {}})).unwrap_err();
        assert!(message.contains("no model.merges"), "{message}");
    }

    #[test]
    fn json_merges_reject_malformed_entries() {
        let message = parse_json_merges(serde_json::json!(["i n", "t h e"])).unwrap_err();
        assert!(message.contains("model.merges[1]"), "{message}");
        let message = parse_json_merges(serde_json::json!({"i": "n"})).unwrap_err();
        assert!(message.contains("not a list of merges"), "{message}");
    }

    #[test]
    fn clip_pipeline_requires_the_special_tokens_in_the_vocabulary() {
        let vocab: Vocab = [("a".to_string(), 0), (START_OF_TEXT.to_string(), 1)].into_iter().collect();
        let message = clip_pipeline(vocab, Merges::new()).err().unwrap();
        assert_eq!(message, format!("no {END_OF_TEXT} token"));
    }
}
