//! Route selection: which of a model's routes to try, in what order. Applies the client's
//! OpenRouter-shaped `provider` preferences (`order`, `only`, `ignore`, `allow_fallbacks`, `sort`),
//! skips routes that cannot serve the request (modality, tools, JSON schema, context length), orders
//! the rest by the model's policy (priority / weighted / cheapest / fastest), and keeps one
//! conversation on one route while that route is healthy (affinity).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::config::{ModelConfig, RouteConfig, RoutingPolicy};
use crate::error::GatewayError;
use crate::gateway::health::{route_key, Availability, Health};
use crate::gateway::model::{ChatRequest, Content, Role};

/// `provider.sort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Price,
    Throughput,
    Latency,
}

/// The client's routing preferences (OpenRouter's `provider` object). Names are tollgate
/// provider names (the `name` of a `[[providers]]` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePrefs {
    pub order: Vec<String>,
    pub only: Vec<String>,
    pub ignore: Vec<String>,
    pub allow_fallbacks: bool,
    pub sort: Option<Sort>,
}

impl Default for RoutePrefs {
    fn default() -> Self {
        RoutePrefs {
            order: Vec::new(),
            only: Vec::new(),
            ignore: Vec::new(),
            allow_fallbacks: true,
            sort: None,
        }
    }
}

fn invalid(msg: impl Into<String>, param: &str) -> GatewayError {
    GatewayError::invalid(msg, Some(param.to_string()))
}

fn names(v: Option<&Value>, param: &str) -> Result<Vec<String>, GatewayError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("'{param}' must be an array of strings"), param))
            })
            .collect(),
        Some(_) => Err(invalid(
            format!("'{param}' must be an array of strings"),
            param,
        )),
    }
}

/// Takes the `provider` object out of the request's unmodelled fields (it is tollgate's to
/// interpret, never forwarded upstream). Unknown members are ignored, as OpenRouter's other
/// filters (`zdr`, `quantizations`, …) have no meaning here.
pub fn take_prefs(extra: &mut Map<String, Value>) -> Result<RoutePrefs, GatewayError> {
    let obj = match extra.remove("provider") {
        None | Some(Value::Null) => return Ok(RoutePrefs::default()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(invalid("'provider' must be an object", "provider")),
    };
    let sort = match obj.get("sort") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let by = match v {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("by").and_then(Value::as_str),
                _ => None,
            };
            Some(match by {
                Some("price") => Sort::Price,
                Some("throughput") => Sort::Throughput,
                Some("latency") => Sort::Latency,
                _ => {
                    return Err(invalid(
                        "'provider.sort' must be \"price\", \"throughput\" or \"latency\"",
                        "provider.sort",
                    ))
                }
            })
        }
    };
    let allow_fallbacks = match obj.get("allow_fallbacks") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(invalid(
                "'provider.allow_fallbacks' must be a boolean",
                "provider.allow_fallbacks",
            ))
        }
    };
    Ok(RoutePrefs {
        order: names(obj.get("order"), "provider.order")?,
        only: names(obj.get("only"), "provider.only")?,
        ignore: names(obj.get("ignore"), "provider.ignore")?,
        allow_fallbacks,
        sort,
    })
}

/// What a request needs from a route.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needs {
    pub modalities: Vec<&'static str>,
    pub tools: bool,
    pub json_schema: bool,
    /// Estimated prompt tokens plus the requested output limit.
    pub context_tokens: u64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

impl Needs {
    pub fn of(req: &ChatRequest, prompt_tokens: u64, model: &ModelConfig) -> Needs {
        let mut modalities = Vec::new();
        for m in &req.messages {
            if let Some(Content::Parts(parts)) = &m.content {
                for p in parts {
                    let need = match p.kind.as_str() {
                        "image_url" | "image" => "image",
                        "video_url" | "video" => "video",
                        "input_audio" => "audio",
                        "file" => "file",
                        _ => continue,
                    };
                    if !modalities.contains(&need) {
                        modalities.push(need);
                    }
                }
            }
        }
        let json_schema = req
            .response_format
            .as_ref()
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
            == Some("json_schema");
        let output = req.max_output_tokens.map(u64::from);
        Needs {
            modalities,
            tools: !req.tools.is_empty(),
            json_schema,
            context_tokens: prompt_tokens + output.unwrap_or(0),
            prompt_tokens,
            // For pricing, a request without a limit is assumed to use a modest answer.
            output_tokens: output.unwrap_or_else(|| u64::from(model.max_output_tokens.min(1024))),
        }
    }

    /// Why `route` cannot serve this request, if it cannot.
    pub fn unmet(&self, model: &ModelConfig, route: &RouteConfig) -> Option<String> {
        let mods = route
            .input_modalities
            .as_ref()
            .unwrap_or(&model.input_modalities);
        if let Some(m) = self
            .modalities
            .iter()
            .find(|m| !mods.iter().any(|x| x == *m))
        {
            return Some(format!("no {m} input"));
        }
        let caps = route.capabilities.as_ref().unwrap_or(&model.capabilities);
        if self.tools && !caps.iter().any(|c| c == "tools") {
            return Some("no tools".into());
        }
        if self.json_schema && !caps.iter().any(|c| c == "json_schema") {
            return Some("no json_schema".into());
        }
        let ctx = u64::from(route.context_length.unwrap_or(model.context_length));
        if self.context_tokens > ctx {
            return Some(format!("context of {ctx} tokens is too small"));
        }
        None
    }

    /// A price for this request's token mix, micro-USD × 10⁶ (no division, no floats).
    pub fn cost(&self, price: &crate::config::Price) -> u128 {
        u128::from(self.prompt_tokens) * u128::from(price.input)
            + u128::from(self.output_tokens) * u128::from(price.output)
    }
}

/// The conversation key of a request: `prompt_cache_key`, else `user`, else a hash of the leading
/// messages (system/developer messages and the first user message, which later turns repeat).
pub fn affinity_key(req: &ChatRequest) -> u64 {
    let mut h = DefaultHasher::new();
    if let Some(k) = &req.prompt_cache_key {
        ("pck", k).hash(&mut h);
    } else if let Some(u) = &req.user {
        ("user", u).hash(&mut h);
    } else {
        "msgs".hash(&mut h);
        for m in &req.messages {
            (m.role as u8).hash(&mut h);
            if let Some(c) = &m.content {
                c.text().hash(&mut h);
            }
            if m.role == Role::User {
                break;
            }
        }
    }
    req.model.hash(&mut h);
    h.finish()
}

/// Remembers which route served each recent conversation.
#[derive(Debug)]
pub struct Affinity {
    map: Mutex<HashMap<u64, (String, Instant)>>,
    cap: usize,
    ttl: Duration,
}

impl Affinity {
    pub fn new(cap: usize, ttl: Duration) -> Affinity {
        Affinity {
            map: Mutex::new(HashMap::new()),
            cap,
            ttl,
        }
    }

    pub fn get(&self, key: u64) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(r, _)| r.clone())
    }

    pub fn set(&self, key: u64, route: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.cap && !map.contains_key(&key) {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= self.cap {
                // Still full of live entries: forget everything rather than grow without bound.
                map.clear();
            }
        }
        map.insert(key, (route.to_string(), Instant::now()));
    }
}

/// Everything the planner looks at.
pub struct PlanInput<'a> {
    pub model: &'a ModelConfig,
    pub needs: &'a Needs,
    pub prefs: &'a RoutePrefs,
    pub health: &'a Health,
    /// Route prices in effect (the config's unless billing knows newer ones).
    pub prices: &'a super::prices::PriceBook,
    /// The route (health key) that served this conversation before, if any.
    pub sticky: Option<&'a str>,
}

/// The model's routes that may serve the request, best first (indices into `model.routes`).
/// Ejected or cooling routes go last; the retry loop decides whether to use them.
pub fn plan(input: &PlanInput<'_>, rng: &mut impl Rng) -> Result<Vec<usize>, GatewayError> {
    let m = input.model;
    let prefs = input.prefs;
    let mut skipped: Vec<String> = Vec::new();
    let mut too_long = 0usize;
    let mut eligible: Vec<usize> = Vec::new();
    for (i, r) in m.routes.iter().enumerate() {
        if !prefs.only.is_empty() && !prefs.only.iter().any(|p| p == &r.provider) {
            continue;
        }
        if prefs.ignore.iter().any(|p| p == &r.provider) {
            continue;
        }
        if !prefs.allow_fallbacks
            && !prefs.order.is_empty()
            && !prefs.order.iter().any(|p| p == &r.provider)
        {
            continue;
        }
        if let Some(why) = input.needs.unmet(m, r) {
            too_long += usize::from(why.starts_with("context"));
            skipped.push(format!("{} ({why})", r.provider));
            continue;
        }
        eligible.push(i);
    }
    if eligible.is_empty() {
        let message = if skipped.is_empty() {
            format!(
                "no route of model {} matches the request's provider preferences",
                m.id
            )
        } else {
            format!(
                "no route of model {} can serve this request: {}",
                m.id,
                skipped.join(", ")
            )
        };
        let all_too_long = too_long > 0 && too_long == skipped.len();
        return Err(GatewayError::InvalidRequest {
            message,
            param: all_too_long.then(|| "messages".to_string()),
            code: Some(if all_too_long {
                "context_length_exceeded"
            } else {
                "no_eligible_route"
            }),
        });
    }

    // Policy order (a client's `sort` replaces the model's policy).
    let policy = match prefs.sort {
        Some(Sort::Price) => RoutingPolicy::Cheapest,
        Some(Sort::Throughput) | Some(Sort::Latency) => RoutingPolicy::Fastest,
        None => m.routing.policy,
    };
    match policy {
        RoutingPolicy::Priority => {}
        RoutingPolicy::Weighted => weighted_shuffle(&mut eligible, |i| m.routes[i].weight, rng),
        // A route without a configured price is not "free": it goes after the priced ones.
        RoutingPolicy::Cheapest => eligible.sort_by_key(|&i| {
            let (price, priced) = input.prices.of(&m.id, &m.routes[i]);
            (!priced, input.needs.cost(&price))
        }),
        RoutingPolicy::Fastest => {
            let latency_only = prefs.sort == Some(Sort::Latency);
            let out = input.needs.output_tokens;
            eligible.sort_by_key(|&i| {
                let (ttft, tps) = input.health.speed(&route_key(&m.routes[i]));
                let gen_ms = match (latency_only, tps) {
                    (false, Some(t)) if t > 0 => out.saturating_mul(1_000_000) / t,
                    _ => 0,
                };
                // Unmeasured routes first, so every route gets measured. A route that has
                // served only complete answers has a throughput (end to end) but no TTFT.
                if ttft.is_none() && gen_ms == 0 {
                    return 0;
                }
                ttft.unwrap_or(0).saturating_add(gen_ms).saturating_add(1)
            });
        }
    }

    // The client's explicit order wins over the policy; affinity applies only when the client
    // expressed no order and the policy is not a fixed priority list.
    if !prefs.order.is_empty() {
        let pos = |i: &usize| {
            prefs
                .order
                .iter()
                .position(|p| p == &m.routes[*i].provider)
                .unwrap_or(usize::MAX)
        };
        eligible.sort_by_key(pos);
    } else if prefs.sort.is_none() && policy != RoutingPolicy::Priority {
        if let Some(sticky) = input.sticky {
            if let Some(p) = eligible
                .iter()
                .position(|&i| route_key(&m.routes[i]) == sticky)
            {
                let i = eligible.remove(p);
                eligible.insert(0, i);
            }
        }
    }

    // Available routes first, keeping the order within each group. A route whose ejection is
    // over keeps its place: this request is its probe, which is how traffic returns to it.
    let now = Instant::now();
    eligible.sort_by_key(
        |&i| match input.health.availability(&route_key(&m.routes[i]), now) {
            Availability::Healthy | Availability::ProbeFree => 0,
            Availability::Cooling(_) => 1,
            Availability::Ejected(_) => 2,
        },
    );
    // `allow_fallbacks: false` without an `order` (OpenRouter: "whether to allow backup
    // providers when the primary is unavailable"): only the primary, the first of the plan.
    if !prefs.allow_fallbacks && prefs.order.is_empty() {
        eligible.truncate(1);
    }
    Ok(eligible)
}

/// Weighted random order without replacement (a weight-0 route only comes after the others).
fn weighted_shuffle(items: &mut [usize], weight: impl Fn(usize) -> u32, rng: &mut impl Rng) {
    for start in 0..items.len() {
        let total: u64 = items[start..].iter().map(|&i| u64::from(weight(i))).sum();
        if total == 0 {
            return;
        }
        let mut pick = rng.gen_range(0..total);
        for j in start..items.len() {
            let w = u64::from(weight(items[j]));
            if pick < w {
                items.swap(start, j);
                break;
            }
            pick -= w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::prices::PriceBook;
    use super::*;
    use crate::config::Config;
    use crate::gateway::model::{ContentPart, Message, Tool};
    use rand::SeedableRng;
    use serde_json::json;
    use std::sync::Arc;

    fn config(policy: &str) -> Config {
        Config::parse(
            &format!(
                r#"
[[providers]]
name = "a"
dialect = "openai"
base_url = "http://127.0.0.1:1/v1"
[[providers]]
name = "b"
dialect = "openai"
base_url = "http://127.0.0.1:2/v1"
[[providers]]
name = "c"
dialect = "openai"
base_url = "http://127.0.0.1:3/v1"
[[models]]
id = "m"
context_length = 1000
input_modalities = ["text", "image", "video"]
capabilities = ["tools", "json_schema"]
routing = {{ policy = "{policy}" }}
  [[models.routes]]
  provider = "a"
  price_per_mtok = {{ input = 1.0, output = 10.0 }}
  weight = 1
  [[models.routes]]
  provider = "b"
  price_per_mtok = {{ input = 2.0, output = 2.0 }}
  weight = 3
  input_modalities = ["text", "image"]
  [[models.routes]]
  provider = "c"
  price_per_mtok = {{ input = 0.5, output = 20.0 }}
  capabilities = []
  context_length = 100
"#
            ),
            "t",
            None,
        )
        .expect("config")
    }

    fn req() -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![Message::new(Role::User, Some(Content::Text("hi".into())))],
            ..Default::default()
        }
    }

    fn names_of(c: &Config, idx: &[usize]) -> Vec<String> {
        idx.iter()
            .map(|&i| c.models[0].routes[i].provider.clone())
            .collect()
    }

    fn run(c: &Config, r: &ChatRequest, prefs: &RoutePrefs, sticky: Option<&str>) -> Vec<String> {
        let health = Arc::new(Health::new(c));
        let needs = Needs::of(r, 10, &c.models[0]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let p = plan(
            &PlanInput {
                model: &c.models[0],
                needs: &needs,
                prefs,
                health: &health,
                prices: &PriceBook::default(),
                sticky,
            },
            &mut rng,
        )
        .expect("plan");
        names_of(c, &p)
    }

    #[test]
    fn priority_keeps_config_order_and_prefs_filter() {
        let c = config("priority");
        let d = RoutePrefs::default();
        assert_eq!(run(&c, &req(), &d, None), ["a", "b", "c"]);
        let p = RoutePrefs {
            order: vec!["c".into(), "b".into()],
            ..RoutePrefs::default()
        };
        assert_eq!(run(&c, &req(), &p, None), ["c", "b", "a"]);
        let p = RoutePrefs {
            allow_fallbacks: false,
            ..p
        };
        assert_eq!(run(&c, &req(), &p, None), ["c", "b"]);
        let p = RoutePrefs {
            allow_fallbacks: false,
            ..RoutePrefs::default()
        };
        assert_eq!(
            run(&c, &req(), &p, None),
            ["a"],
            "no order: the primary only"
        );
        let p = RoutePrefs {
            ignore: vec!["a".into()],
            ..RoutePrefs::default()
        };
        assert_eq!(run(&c, &req(), &p, None), ["b", "c"]);
        let p = RoutePrefs {
            only: vec!["b".into()],
            ..RoutePrefs::default()
        };
        assert_eq!(run(&c, &req(), &p, None), ["b"]);
    }

    #[test]
    fn capabilities_skip_routes() {
        let c = config("priority");
        let d = RoutePrefs::default();
        let mut r = req();
        r.tools = vec![Tool {
            kind: "function".into(),
            function: None,
            extra: Map::new(),
        }];
        assert_eq!(run(&c, &r, &d, None), ["a", "b"], "c has no tools");
        let mut r = req();
        r.messages[0].content = Some(Content::Parts(vec![ContentPart {
            kind: "video_url".into(),
            text: None,
            image_url: None,
            video_url: Some(json!({"url": "https://x/v.mp4"})),
            extra: Map::new(),
        }]));
        assert_eq!(run(&c, &r, &d, None), ["a", "c"], "b has no video");
        let mut r = req();
        r.max_output_tokens = Some(500);
        assert_eq!(run(&c, &r, &d, None), ["a", "b"], "c's context is 100");
        let mut r = req();
        r.max_output_tokens = Some(5000);
        let health = Health::new(&c);
        let needs = Needs::of(&r, 10, &c.models[0]);
        let err = plan(
            &PlanInput {
                model: &c.models[0],
                needs: &needs,
                prefs: &d,
                health: &health,
                prices: &PriceBook::default(),
                sticky: None,
            },
            &mut rand::rngs::StdRng::seed_from_u64(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("context"), "{err}");
    }

    #[test]
    fn cheapest_uses_the_token_mix() {
        let c = config("cheapest");
        let d = RoutePrefs::default();
        // 10 prompt + 80 output tokens: b (2+2) is cheapest, then a (1+10), then c (0.5+20).
        let mut r = req();
        r.max_output_tokens = Some(80);
        assert_eq!(run(&c, &r, &d, None), ["b", "a", "c"]);
        // With a 1000-token prompt and 1 output token, c's cheap input wins (context permitting).
        let needs = Needs {
            prompt_tokens: 1000,
            output_tokens: 1,
            ..Needs::default()
        };
        let routes = &c.models[0].routes;
        assert!(needs.cost(&routes[2].price) < needs.cost(&routes[0].price));
        // An unpriced route (cost 0) is not the cheapest: it comes last.
        let mut c = c;
        c.models[0].routes[1].priced = false;
        c.models[0].routes[1].price = Default::default();
        assert_eq!(run(&c, &r, &d, None), ["a", "c", "b"]);
    }

    #[test]
    fn weighted_follows_weights_and_affinity_sticks() {
        let c = config("weighted");
        let d = RoutePrefs::default();
        let health = Health::new(&c);
        let needs = Needs::of(&req(), 10, &c.models[0]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut first_b = 0;
        for _ in 0..4000 {
            let p = plan(
                &PlanInput {
                    model: &c.models[0],
                    needs: &needs,
                    prefs: &d,
                    health: &health,
                    prices: &PriceBook::default(),
                    sticky: None,
                },
                &mut rng,
            )
            .expect("plan");
            if c.models[0].routes[p[0]].provider == "b" {
                first_b += 1;
            }
        }
        // b has weight 3 of 5: about 2400 of 4000.
        assert!((2200..2600).contains(&first_b), "{first_b}");
        for _ in 0..20 {
            assert_eq!(run(&c, &req(), &d, Some("c/m"))[0], "c");
        }
    }

    #[test]
    fn fastest_prefers_measured_speed_and_measures_unknown_routes_first() {
        let c = config("fastest");
        let health = Arc::new(Health::new(&c));
        let now = Instant::now();
        // a: slow first token, fast generation; b: fast first token, slow generation.
        health
            .acquire("a/m", now, false)
            .expect("a")
            .success(Some(Duration::from_millis(900)));
        health.throughput("a/m", 1000, Duration::from_secs(1));
        health
            .acquire("b/m", now, false)
            .expect("b")
            .success(Some(Duration::from_millis(100)));
        health.throughput("b/m", 10, Duration::from_secs(1));
        let d = RoutePrefs::default();
        let order = |prefs: &RoutePrefs, out: u32| {
            let mut r = req();
            r.max_output_tokens = Some(out);
            let needs = Needs::of(&r, 10, &c.models[0]);
            let p = plan(
                &PlanInput {
                    model: &c.models[0],
                    needs: &needs,
                    prefs,
                    health: &health,
                    prices: &PriceBook::default(),
                    sticky: None,
                },
                &mut rand::rngs::StdRng::seed_from_u64(1),
            )
            .expect("plan");
            names_of(&c, &p)
        };
        // c is unmeasured: tried first. For 80 output tokens a (0.9 s + 0.08 s) beats b (0.1 s + 8 s).
        assert_eq!(order(&d, 80), ["c", "a", "b"]);
        // Sorting by latency looks at the first token only.
        let lat = RoutePrefs {
            sort: Some(Sort::Latency),
            ..RoutePrefs::default()
        };
        assert_eq!(order(&lat, 80), ["c", "b", "a"]);
        // c then serves complete answers only: 50 tokens/s end to end, no TTFT. It is ranked by
        // that (80 tokens: 1.6 s, after a's 0.98 s, before b's 8.1 s) instead of as unmeasured;
        // by latency alone it is still unmeasured.
        health.throughput("c/m", 50, Duration::from_secs(1));
        assert_eq!(order(&d, 80), ["a", "c", "b"]);
        assert_eq!(order(&lat, 80), ["c", "b", "a"]);
    }

    #[test]
    fn affinity_key_is_stable_across_turns() {
        let mut r1 = req();
        r1.messages.insert(
            0,
            Message::new(Role::System, Some(Content::Text("sys".into()))),
        );
        let mut r2 = r1.clone();
        r2.messages.push(Message::new(
            Role::Assistant,
            Some(Content::Text("hello".into())),
        ));
        r2.messages
            .push(Message::new(Role::User, Some(Content::Text("more".into()))));
        assert_eq!(affinity_key(&r1), affinity_key(&r2));
        let mut r3 = r1.clone();
        r3.messages[1].content = Some(Content::Text("other".into()));
        assert_ne!(affinity_key(&r1), affinity_key(&r3));
        let mut r4 = r3.clone();
        r4.prompt_cache_key = Some("conv-1".into());
        let mut r5 = r1.clone();
        r5.prompt_cache_key = Some("conv-1".into());
        assert_eq!(affinity_key(&r4), affinity_key(&r5));
    }

    #[test]
    fn prefs_parse_and_leave_extra() {
        let mut extra = Map::new();
        extra.insert(
            "provider".into(),
            json!({"order": ["a"], "allow_fallbacks": false, "sort": {"by": "price"}, "zdr": true}),
        );
        let p = take_prefs(&mut extra).expect("prefs");
        assert!(extra.is_empty());
        assert_eq!(p.order, ["a"]);
        assert!(!p.allow_fallbacks);
        assert_eq!(p.sort, Some(Sort::Price));
        extra.insert("provider".into(), json!({"only": "a"}));
        assert!(take_prefs(&mut extra).is_err());
    }
}
