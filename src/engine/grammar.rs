//! Structured output: GBNF grammars for `response_format` (json_object, json_schema) and the grammar-backed token filter.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use super::sampler::TokenFilter;

/// Any JSON object; whitespace between tokens is bounded so a model cannot pad forever.
pub const JSON_OBJECT_GBNF: &str = r#"root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number ::= "-"? ( [0-9] | [1-9] [0-9]{1,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,4} )? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;

/// Why a `response_format` cannot be enforced.
#[derive(Debug, thiserror::Error)]
pub enum GrammarBuildError {
    /// The JSON schema uses something the converter does not support.
    #[error("unsupported JSON schema: {0}")]
    Schema(String),
    /// llama.cpp rejected the grammar.
    #[error("invalid grammar: {0}")]
    Grammar(String),
}

/// Converts a JSON schema into GBNF with llama.cpp's own converter.
pub fn schema_to_gbnf(schema: &serde_json::Value) -> Result<String, GrammarBuildError> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(GrammarBuildError::Schema(
            "the schema must be a JSON object".into(),
        ));
    }
    let text = schema.to_string();
    llama_cpp_2::json_schema_to_grammar(&text).map_err(|e| GrammarBuildError::Schema(e.to_string()))
}

/// A compiled grammar constraining sampling.
#[derive(Debug)]
pub struct Grammar {
    sampler: LlamaSampler,
    scratch: Vec<LlamaTokenData>,
}

impl Grammar {
    /// Compiles `gbnf` (root rule `root`) against the model's vocabulary.
    pub fn new(model: &LlamaModel, gbnf: &str) -> Result<Self, GrammarBuildError> {
        let sampler = LlamaSampler::grammar(model, gbnf, "root")
            .map_err(|e| GrammarBuildError::Grammar(e.to_string()))?;
        Ok(Self {
            sampler,
            scratch: Vec::new(),
        })
    }
}

impl TokenFilter for Grammar {
    fn allows(&mut self, token: i32) -> bool {
        let mut one = LlamaTokenDataArray::new(
            vec![LlamaTokenData::new(LlamaToken(token), 0.0, 0.0)],
            false,
        );
        self.sampler.apply(&mut one);
        one.data.first().is_some_and(|d| d.logit().is_finite())
    }

    fn mask(&mut self, logits: &mut [f32]) {
        let mut data = std::mem::take(&mut self.scratch);
        data.clear();
        for (i, &l) in logits.iter().enumerate() {
            if l.is_finite() {
                if let Ok(id) = i32::try_from(i) {
                    data.push(LlamaTokenData::new(LlamaToken(id), l, 0.0));
                }
            }
        }
        let mut arr = LlamaTokenDataArray::new(data, false);
        self.sampler.apply(&mut arr);
        for d in &arr.data {
            if !d.logit().is_finite() {
                if let Some(l) = usize::try_from(d.id().0)
                    .ok()
                    .and_then(|i| logits.get_mut(i))
                {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        self.scratch = arr.data;
    }

    fn accept(&mut self, token: i32) {
        if let Err(e) = self.sampler.try_accept(LlamaToken(token)) {
            tracing::warn!(error = %e, "grammar rejected an accepted token");
        }
    }
}
