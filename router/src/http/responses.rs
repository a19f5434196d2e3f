//! The error answers each route documents in OpenAPI, declared once per error shape.

use crate::errors::{ErrorBody, OpenAiErrorBody};

/// The error answers of a route that takes a body, declared once for each error shape
/// (utoipa's `IntoResponses`, listed in each handler's `responses(...)`).
macro_rules! error_responses {
    ($name:ident, $auth:ident, $body:ty) => {
        #[derive(utoipa::IntoResponses)]
        #[allow(dead_code)]
        pub enum $name {
            #[response(
                status = 401,
                description = "API key missing or wrong (only with --api-key)"
            )]
            Unauthorized($body),
            #[response(status = 413, description = "Body over --payload-limit")]
            PayloadTooLarge($body),
            #[response(status = 415, description = "Content-Type is not application/json")]
            UnsupportedMediaType($body),
            #[response(
                status = 422,
                description = "Invalid input; the message names the field and the limit"
            )]
            Validation($body),
            #[response(status = 424, description = "Generation failed")]
            Generation($body),
            #[response(status = 429, description = "Too many requests in flight")]
            Overloaded($body),
            #[response(
                status = 503,
                description = "Executor unavailable, queue wait exceeded, or shutting down"
            )]
            Unavailable($body),
        }

        /// The error answer of a route without a body: only the key can be wrong.
        #[derive(utoipa::IntoResponses)]
        #[allow(dead_code)]
        pub enum $auth {
            #[response(
                status = 401,
                description = "API key missing or wrong (only with --api-key)"
            )]
            Unauthorized($body),
        }
    };
}

error_responses!(TgiErrors, TgiAuthErrors, ErrorBody);
error_responses!(OpenAiErrors, OpenAiAuthErrors, OpenAiErrorBody);

/// The error answers of the rollout-control routes (TGI's error shape).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ControlErrors {
    #[response(
        status = 401,
        description = "Control key missing or wrong (`Authorization: Bearer <rl-control-key>`)"
    )]
    Unauthorized(ErrorBody),
    #[response(
        status = 404,
        description = "/abort_request: no live request has that rid"
    )]
    NotFound(ErrorBody),
    #[response(
        status = 409,
        description = "The server's state forbids it now (e.g. an update while the weights are released)"
    )]
    Conflict(ErrorBody),
    #[response(status = 413, description = "Body over --rl-max-payload-bytes")]
    PayloadTooLarge(ErrorBody),
    #[response(status = 415, description = "Content-Type is not application/json")]
    UnsupportedMediaType(ErrorBody),
    #[response(
        status = 422,
        description = "Bad payload; the message names the field or tensor. Nothing was changed"
    )]
    Validation(ErrorBody),
    #[response(status = 500, description = "The executor failed the operation")]
    ControlFailed(ErrorBody),
    #[response(
        status = 501,
        description = "The engine cannot do this; the message names it"
    )]
    NotImplemented(ErrorBody),
    #[response(status = 503, description = "Executor unavailable, or shutting down")]
    Unavailable(ErrorBody),
}
