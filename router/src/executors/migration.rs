//! Moving a request whose worker was lost to another worker: the same request with the tokens
//! generated so far appended to its prompt and taken off its budgets, marked as resumed so the
//! engine continues its steps (seeded sampling, penalties) where they stopped. The client's
//! stream is the same channel throughout, so no token is lost or repeated.

use crate::executors::client::Resume;
use crate::pb;

/// Why a lost request ends instead of moving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmovable {
    #[error("{reason}; migration is off (--migration-limit 0)")]
    Off { reason: String },
    #[error(
        "{reason}; the request is guided by a grammar (response_format, tools or a grammar \
         parameter), whose matcher state cannot be moved to another executor, so it was not \
         migrated"
    )]
    Grammar { reason: String },
    #[error("{reason}; the request already moved {limit} times (--migration-limit {limit})")]
    Limit { reason: String, limit: u32 },
    #[error("{reason}; no other executor is healthy to continue it")]
    NoWorker { reason: String },
}

/// Whether a request may move at all (checked when it is first sent: only a request that may
/// is kept for it).
pub fn movable(request: &pb::GenerateRequest) -> bool {
    request.grammar.is_none()
}

/// The request to send to the next worker, or the reason it cannot move. `Ok(None)`: the
/// budget is already spent (the lost worker generated every token but its last output never
/// arrived): the request is complete.
pub fn resumed_request(
    id: u64,
    resume: &mut Resume,
    limit: u32,
    reason: &str,
) -> Result<Option<pb::GenerateRequest>, Unmovable> {
    if limit == 0 {
        return Err(Unmovable::Off {
            reason: reason.into(),
        });
    }
    if !movable(&resume.original) {
        return Err(Unmovable::Grammar {
            reason: reason.into(),
        });
    }
    if resume.migrations >= limit {
        return Err(Unmovable::Limit {
            reason: reason.into(),
            limit,
        });
    }
    let generated = u32::try_from(resume.generated.len()).unwrap_or(u32::MAX);
    let original = &resume.original;
    if generated >= original.max_new_tokens {
        return Ok(None);
    }
    resume.migrations += 1;
    let mut input_ids = Vec::with_capacity(original.input_ids.len() + resume.generated.len());
    input_ids.extend_from_slice(&original.input_ids);
    input_ids.extend_from_slice(&resume.generated);
    Ok(Some(pb::GenerateRequest {
        id,
        input_ids,
        max_new_tokens: original.max_new_tokens - generated,
        min_new_tokens: original.min_new_tokens.saturating_sub(generated),
        resumed_tokens: generated,
        // The prompt's log probabilities went out with the first output already.
        return_prompt_logprobs: original.return_prompt_logprobs && resume.generated.is_empty(),
        ..original.clone()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(generated: Vec<u32>) -> Resume {
        Resume {
            original: pb::GenerateRequest {
                id: 7,
                input_ids: vec![1, 2, 3],
                max_new_tokens: 10,
                min_new_tokens: 4,
                sampling: Some(pb::SamplingParams {
                    do_sample: true,
                    seed: Some(42),
                    ..Default::default()
                }),
                return_prompt_logprobs: true,
                ..Default::default()
            },
            generated,
            migrations: 0,
        }
    }

    #[test]
    fn a_resumed_request_carries_its_tokens_and_the_rest_of_its_budgets() {
        let mut r = resume(vec![9, 8]);
        let next = resumed_request(7, &mut r, 3, "lost").unwrap().unwrap();
        assert_eq!(next.input_ids, vec![1, 2, 3, 9, 8]);
        assert_eq!(next.max_new_tokens, 8);
        assert_eq!(next.min_new_tokens, 2);
        assert_eq!(next.resumed_tokens, 2);
        assert_eq!(next.sampling.and_then(|s| s.seed), Some(42));
        assert!(!next.return_prompt_logprobs);
        assert_eq!(r.migrations, 1);
        // Not started yet: it is sent as it was, prompt log probabilities included.
        let mut fresh = resume(vec![]);
        let again = resumed_request(7, &mut fresh, 3, "lost").unwrap().unwrap();
        assert_eq!(again.input_ids, vec![1, 2, 3]);
        assert!(again.return_prompt_logprobs);
    }

    #[test]
    fn limits_grammars_and_spent_budgets() {
        let mut r = resume(vec![5]);
        for _ in 0..2 {
            assert!(resumed_request(7, &mut r, 2, "lost").unwrap().is_some());
        }
        let err = resumed_request(7, &mut r, 2, "lost").unwrap_err();
        assert!(err.to_string().contains("--migration-limit 2"), "{err}");
        assert!(matches!(
            resumed_request(7, &mut resume(vec![]), 0, "lost"),
            Err(Unmovable::Off { .. })
        ));
        let mut guided = resume(vec![]);
        guided.original.grammar = Some(pb::Grammar::default());
        let err = resumed_request(7, &mut guided, 3, "lost").unwrap_err();
        assert!(err.to_string().contains("grammar"), "{err}");
        let mut spent = resume((0..10).collect());
        assert_eq!(resumed_request(7, &mut spent, 3, "lost"), Ok(None));
    }
}
