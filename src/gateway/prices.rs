//! Route prices in effect now as the billing store knows them (admin-set versions included),
//! laid over the config file's prices wherever the gateway itself prices a route: the `cheapest`
//! routing order and the limiter's spend estimates. Empty (config prices only) without billing.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::config::{Price, RouteConfig};

/// model id → provider name (`""` = every route of the model) → price per 1M tokens, micro-USD.
pub type PriceMap = HashMap<String, HashMap<String, Price>>;

#[derive(Default)]
pub struct PriceBook {
    map: RwLock<PriceMap>,
}

impl PriceBook {
    /// Replaces every price (billing calls it whenever it reloads its versions).
    pub fn replace(&self, map: PriceMap) {
        if let Ok(mut m) = self.map.write() {
            *m = map;
        }
    }

    /// The price of `route` of `model` now, and whether the route is priced at all: the store's
    /// provider-specific version, else its model-wide one, else the config file's.
    pub fn of(&self, model: &str, route: &RouteConfig) -> (Price, bool) {
        let known = self.map.read().ok().and_then(|m| {
            let p = m.get(model)?;
            p.get(&route.provider).or_else(|| p.get("")).copied()
        });
        match known {
            Some(p) => (p, true),
            None => (route.price, route.priced),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(provider: &str, input: u64) -> RouteConfig {
        let cfg = crate::config::Config::builtin_default().unwrap_or_else(|e| panic!("{e}"));
        let mut r = cfg.models[0].routes[0].clone();
        r.provider = provider.to_string();
        r.price = Price {
            input,
            cached_input: input,
            output: input,
        };
        r
    }

    #[test]
    fn store_prices_override_the_config_provider_first() {
        let book = PriceBook::default();
        let (a, b) = (route("a", 1), route("b", 2));
        assert_eq!(
            book.of("m", &a).0.input,
            1,
            "config price without a store price"
        );
        let p = |input| Price {
            input,
            cached_input: input,
            output: input,
        };
        book.replace(HashMap::from([(
            "m".to_string(),
            HashMap::from([("a".to_string(), p(10)), (String::new(), p(20))]),
        )]));
        assert_eq!(book.of("m", &a), (p(10), true), "provider-specific version");
        assert_eq!(book.of("m", &b), (p(20), true), "model-wide version");
        assert_eq!(
            book.of("other", &b).0.input,
            2,
            "other models keep the config"
        );
    }
}
