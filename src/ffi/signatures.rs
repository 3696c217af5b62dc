//! Compile-time check that every export has exactly the signature of its declaration
//! in the bindgen output of `include/hiprune.h`: both function items are coerced to
//! one function-pointer type, which fails to compile if any parameter or the return
//! type differs (the argument count is spelled out once, as `_` placeholders).

use super::bindings as decl;
use super::{context as c, library as l, model as m};

macro_rules! same_signature {
    ($($module:ident :: $name:ident ( $($arg:tt),* );)*) => {
        const _: () = {
            $(
                let _: [unsafe extern "C" fn($($arg),*) -> _; 2] = [decl::$name, $module::$name];
            )*
        };
    };
}

same_signature! {
    l::hp_abi_version();
    l::hp_version_string();
    l::hp_status_string(_);
    l::hp_last_error_message();
    l::hp_log_set(_, _);
    m::hp_model_load(_, _);
    m::hp_model_free(_);
    m::hp_model_get_info(_, _);
    m::hp_model_blocks(_, _, _, _, _);
    c::hp_context_default_params();
    c::hp_context_create(_, _, _);
    c::hp_context_free(_);
    c::hp_context_get_info(_, _);
    c::hp_forward(_, _, _, _, _, _, _, _, _, _, _, _);
    c::hp_sample_default_params();
    c::hp_sample(_, _, _, _, _, _, _, _, _, _, _, _, _, _, _);
    c::hp_context_memory(_, _);
}
