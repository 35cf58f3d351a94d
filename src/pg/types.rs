//! SQL argument types that pgrx does not provide in the form the extension needs.

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::prelude::*;

/// Declares a newtype argument over a raw datum, mapped to SQL type `$sql`.
macro_rules! raw_arg {
    ($(#[$doc:meta])* $name:ident($inner:ty), $sql:literal, $from:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(pub $inner);

        impl FromDatum for $name {
            unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
                let from: fn(pg_sys::Datum) -> $inner = $from;
                if is_null { None } else { Some($name(from(datum))) }
            }
        }

        // SAFETY: unboxes through FromDatum, which checks for NULL; the datum's type is the SQL type
        // declared below, which PostgreSQL checked when it called the function.
        unsafe impl<'fcx> ArgAbi<'fcx> for $name {
            unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                // SAFETY: see the impl: the argument is of this type.
                unsafe { arg.unbox_arg_using_from_datum() }
                    .unwrap_or_else(|| panic!("argument {index} must not be null"))
            }

            unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
                // SAFETY: see the impl: the argument is of this type.
                unsafe { arg.unbox_arg_using_from_datum::<$name>() }.into()
            }
        }

        // SAFETY: the SQL type named here is the one the datum holds (jsonb, regprocedure).
        unsafe impl SqlTranslatable for $name {
            const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!($name);
            const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
            const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal($sql));
            const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal($sql)));
        }
    };
}

raw_arg!(
    /// A `jsonb` argument kept as the datum PostgreSQL gave us. `pgrx::JsonB` would print the value
    /// to text and parse it into serde_json, and back again to store it: the append path passes
    /// the datum straight to the INSERT instead.
    RawJsonb(pg_sys::Datum), "jsonb", |d| d
);

raw_arg!(
    /// A `regprocedure` argument: the function's OID, resolved (and checked to exist) by the
    /// regprocedure input function before we are called.
    RegProcedure(pg_sys::Oid), "regprocedure", |d| pg_sys::Oid::from(d.value() as u32)
);
