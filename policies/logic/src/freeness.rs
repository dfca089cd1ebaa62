//! Freeness: how many more decode steps an instance's batch can run, as an
//! exact fraction (no floating point, so Wasm and native agree bit for bit).

use core::cmp::Ordering;

/// Free blocks per request, exactly: `numerator / denominator`, or one of the
/// infinities. Higher is freer. `NegInf` is a draining instance (infinite
/// virtual usage); `PosInf` an instance with nothing to feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freeness {
    NegInf,
    Finite { numerator: i64, denominator: u64 },
    PosInf,
}

impl Freeness {
    /// `numerator / denominator`; a zero denominator is `PosInf`.
    pub fn ratio(numerator: i64, denominator: u64) -> Self {
        if denominator == 0 {
            Freeness::PosInf
        } else {
            Freeness::Finite {
                numerator,
                denominator,
            }
        }
    }

    /// Free blocks shared by `requests`: `free / requests` while `free` is
    /// not negative, `free × requests` (at least `free`) once it is. Llumnix's
    /// artifact divides in both cases, so that past saturation the instance
    /// with the largest queue looks the freest (−40 blocks over 10 requests
    /// ranks above −8 over 1) and every arrival herds onto it; multiplying
    /// keeps the order falling with more requests on both sides of zero.
    /// No request and no deficit is `PosInf`, as in [`Freeness::ratio`].
    pub fn per_request(free: i64, requests: u64) -> Self {
        if free >= 0 {
            Freeness::ratio(free, requests)
        } else {
            let n = i64::try_from(requests.max(1)).unwrap_or(i64::MAX);
            Freeness::ratio(free.saturating_mul(n), 1)
        }
    }

    /// True when strictly below the integer threshold `t`.
    pub fn below(self, t: i64) -> bool {
        self < Freeness::ratio(t, 1)
    }

    /// True when strictly above the integer threshold `t`.
    pub fn above(self, t: i64) -> bool {
        self > Freeness::ratio(t, 1)
    }

    fn rank(self) -> u8 {
        match self {
            Freeness::NegInf => 0,
            Freeness::Finite { .. } => 1,
            Freeness::PosInf => 2,
        }
    }
}

impl Ord for Freeness {
    fn cmp(&self, other: &Self) -> Ordering {
        match (*self, *other) {
            (
                Freeness::Finite {
                    numerator: a,
                    denominator: da,
                },
                Freeness::Finite {
                    numerator: b,
                    denominator: db,
                },
            ) => {
                // Cross-multiply, exactly. Real block counts keep both
                // factors below 2^31, so the products fit in 64 bits; only
                // absurd values take the 128-bit path (which on wasm32 is a
                // slow library call, as is a checked multiplication).
                const SMALL: u64 = 1 << 31;
                if a.unsigned_abs() < SMALL && b.unsigned_abs() < SMALL && da < SMALL && db < SMALL
                {
                    (a * db as i64).cmp(&(b * da as i64))
                } else {
                    (i128::from(a) * i128::from(db)).cmp(&(i128::from(b) * i128::from(da)))
                }
            }
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

impl PartialOrd for Freeness {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_exactly() {
        assert!(Freeness::ratio(1, 3) < Freeness::ratio(1, 2));
        assert_eq!(
            Freeness::ratio(2, 4).cmp(&Freeness::ratio(1, 2)),
            Ordering::Equal
        );
        assert!(Freeness::ratio(-5, 1) < Freeness::ratio(0, 7));
        assert!(Freeness::NegInf < Freeness::ratio(i64::MIN, 1));
        assert!(Freeness::ratio(i64::MAX, 1) < Freeness::ratio(3, 0));
        assert!(Freeness::ratio(5, 2).below(3) && Freeness::ratio(7, 2).above(3));
        // Per request: more requests is less free on both sides of zero.
        let f = Freeness::per_request;
        assert!(f(40, 10) < f(8, 1) && f(-40, 10) < f(-8, 1));
        assert!(f(-1, 100) < f(0, 100) && f(0, 100) < f(1, 100));
        assert_eq!(f(-5, 0), Freeness::ratio(-5, 1));
        assert_eq!(f(0, 0), Freeness::PosInf);
        assert_eq!(f(i64::MIN / 2, 4), Freeness::ratio(i64::MIN, 1));
        // Beyond 64-bit cross products: the 128-bit path decides.
        assert!(Freeness::ratio(i64::MAX, u64::MAX) < Freeness::ratio(i64::MAX - 1, u64::MAX / 2));
        assert!(Freeness::ratio(i64::MIN, 3) < Freeness::ratio(i64::MIN + 1, 3));
        assert!(!Freeness::ratio(6, 2).below(3) && !Freeness::ratio(6, 2).above(3));
    }
}
