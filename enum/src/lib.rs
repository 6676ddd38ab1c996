//! # vfmig-enum: integer <-> enum tables
//!
//! vfmig names integers in several places: frame kinds, codecs, handshake message types, refusal
//! codes, abort reasons, outcomes (docs/PROTOCOL.md) and VFIO device states (the kernel uAPI).
//! Each is one [`int_enum!`] instead of a hand-written `from_u8` / `code` / `name` / `Display`
//! set that has to be kept in step with the enum by hand.
//!
//! Two kinds of table:
//! - **closed**: a value outside the table is refused. The enum is `#[repr(int)]` with the
//!   values as discriminants (so `kind as u8` works), `from_code` returns `Option`, and
//!   `TryFrom<int>` fails with [`UnknownValue`] carrying the value.
//! - **open** (`unknown Name;` after the table): the protocol carries values it does not know
//!   (an abort reason from a newer peer). The enum gains a `Name(int)` variant, and
//!   `from_code` / `From<int>` are total.
//!
//! Both get `ALL` (the known values in declaration order), `code()`, `name()` (the variant's
//! name, or the string after `=>`), `From<Enum> for int`, and `Display` writing `name()`
//! (unknown values of an open table as `Name(n)`); `display manual;` leaves `Display` to the
//! caller. Duplicate values do not compile.
//!
//! ```
//! vfmig_enum::int_enum! {
//!     /// A closed table.
//!     #[derive(Clone, Copy, Debug, PartialEq, Eq)]
//!     pub enum Color: u8 {
//!         /// Red.
//!         Red = 1,
//!         /// Dark green, as the spec spells it.
//!         DarkGreen = 2 => "dark green",
//!     }
//! }
//! assert_eq!(Color::try_from(2u8), Ok(Color::DarkGreen));
//! assert_eq!(Color::try_from(9u8).unwrap_err().value, 9);
//! assert_eq!(Color::DarkGreen.to_string(), "dark green");
//! assert_eq!(Color::Red as u8, 1);
//!
//! vfmig_enum::int_enum! {
//!     /// An open table.
//!     #[derive(Clone, Copy, Debug, PartialEq, Eq)]
//!     pub enum Reason: u16 {
//!         /// Cancelled.
//!         Cancelled = 1,
//!     }
//!     unknown Unknown;
//! }
//! assert_eq!(Reason::from(7u16), Reason::Unknown(7));
//! assert_eq!(u16::from(Reason::Unknown(7)), 7);
//! assert_eq!(Reason::Unknown(7).to_string(), "Unknown(7)");
//! assert_eq!(Reason::ALL, [Reason::Cancelled]);
//! ```
#![forbid(unsafe_code)]

use std::fmt;

/// A value that is none of a closed table's known values: the `TryFrom` error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnknownValue<T> {
    /// The enum's name.
    pub of: &'static str,
    /// The value.
    pub value: T,
}

impl<T: fmt::Display> fmt::Display for UnknownValue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} value {}", self.of, self.value)
    }
}

impl<T: fmt::Debug + fmt::Display> std::error::Error for UnknownValue<T> {}

/// Defines an enum over integer values with its conversions, names and `Display`; see the
/// crate documentation for the two forms.
#[macro_export]
macro_rules! int_enum {
    // ---- Internal rules.
    (@closed
        [$(#[$meta:meta])*] $vis:vis $name:ident $int:ident
        [$( [$(#[$vmeta:meta])*] $variant:ident = $value:literal $(=> $label:literal)? )+]
    ) => {
        $(#[$meta])*
        #[repr($int)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every known value, in declaration order.
            pub const ALL: [$name; $crate::__count!($($variant)+)] = [$($name::$variant),+];

            /// The integer value.
            pub const fn code(self) -> $int {
                self as $int
            }

            /// The known value `code` stands for; `None` for any other.
            pub const fn from_code(code: $int) -> ::core::option::Option<$name> {
                match code {
                    $( $value => ::core::option::Option::Some($name::$variant), )+
                    _ => ::core::option::Option::None,
                }
            }

            /// The value's name in the documentation (docs/PROTOCOL.md, or the uAPI's).
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $crate::__label!($variant $($label)?), )+
                }
            }
        }

        impl ::core::convert::From<$name> for $int {
            fn from(v: $name) -> $int {
                v.code()
            }
        }

        impl ::core::convert::TryFrom<$int> for $name {
            type Error = $crate::UnknownValue<$int>;

            fn try_from(code: $int) -> ::core::result::Result<$name, $crate::UnknownValue<$int>> {
                match $name::from_code(code) {
                    ::core::option::Option::Some(v) => ::core::result::Result::Ok(v),
                    ::core::option::Option::None => ::core::result::Result::Err(
                        $crate::UnknownValue { of: ::core::stringify!($name), value: code },
                    ),
                }
            }
        }
    };

    (@open
        [$(#[$meta:meta])*] $vis:vis $name:ident $int:ident $unknown:ident
        [$( [$(#[$vmeta:meta])*] $variant:ident = $value:literal $(=> $label:literal)? )+]
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this version does not know, carried as is.
            $unknown($int),
        }

        impl $name {
            /// Every known value, in declaration order.
            pub const ALL: [$name; $crate::__count!($($variant)+)] = [$($name::$variant),+];

            /// The integer value.
            pub const fn code(self) -> $int {
                match self {
                    $( $name::$variant => $value, )+
                    $name::$unknown(code) => code,
                }
            }

            /// The value `code` stands for: a known one, else the unknown variant carrying it.
            #[deny(unreachable_patterns)]
            pub const fn from_code(code: $int) -> $name {
                match code {
                    $( $value => $name::$variant, )+
                    code => $name::$unknown(code),
                }
            }

            /// Whether the value is a known one.
            pub const fn is_known(self) -> bool {
                !matches!(self, $name::$unknown(_))
            }

            /// The value's name in the documentation (docs/PROTOCOL.md); the unknown variant's
            /// name for unknown values.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $crate::__label!($variant $($label)?), )+
                    $name::$unknown(_) => ::core::stringify!($unknown),
                }
            }
        }

        impl ::core::convert::From<$name> for $int {
            fn from(v: $name) -> $int {
                v.code()
            }
        }

        impl ::core::convert::From<$int> for $name {
            fn from(code: $int) -> $name {
                $name::from_code(code)
            }
        }
    };

    (@display $name:ident) => {
        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };

    (@display $name:ident $unknown:ident) => {
        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                match self {
                    $name::$unknown(code) => {
                        ::core::write!(f, "{}({})", ::core::stringify!($unknown), code)
                    }
                    known => f.write_str(known.name()),
                }
            }
        }
    };

    // ---- The four forms.
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $int:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal $(=> $label:literal)? ),+ $(,)?
        }
        unknown $unknown:ident;
        display manual;
    ) => {
        $crate::int_enum!(@open [$(#[$meta])*] $vis $name $int $unknown
            [$( [$(#[$vmeta])*] $variant = $value $(=> $label)? )+]);
    };

    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $int:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal $(=> $label:literal)? ),+ $(,)?
        }
        unknown $unknown:ident;
    ) => {
        $crate::int_enum!(@open [$(#[$meta])*] $vis $name $int $unknown
            [$( [$(#[$vmeta])*] $variant = $value $(=> $label)? )+]);
        $crate::int_enum!(@display $name $unknown);
    };

    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $int:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal $(=> $label:literal)? ),+ $(,)?
        }
        display manual;
    ) => {
        $crate::int_enum!(@closed [$(#[$meta])*] $vis $name $int
            [$( [$(#[$vmeta])*] $variant = $value $(=> $label)? )+]);
    };

    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $int:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal $(=> $label:literal)? ),+ $(,)?
        }
    ) => {
        $crate::int_enum!(@closed [$(#[$meta])*] $vis $name $int
            [$( [$(#[$vmeta])*] $variant = $value $(=> $label)? )+]);
        $crate::int_enum!(@display $name);
    };
}

/// Counts identifiers (for `ALL`'s length).
#[doc(hidden)]
#[macro_export]
macro_rules! __count {
    () => { 0usize };
    ($head:ident $($tail:ident)*) => { 1usize + $crate::__count!($($tail)*) };
}

/// A variant's name: the string given after `=>`, else the identifier.
#[doc(hidden)]
#[macro_export]
macro_rules! __label {
    ($variant:ident) => {
        ::core::stringify!($variant)
    };
    ($variant:ident $label:literal) => {
        $label
    };
}

#[cfg(test)]
mod tests {
    use super::UnknownValue;

    int_enum! {
        /// Closed.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Closed: u8 {
            /// Zero.
            Zero = 0,
            /// Two, spelled otherwise.
            Two = 2 => "TWO",
            /// Big.
            Big = 255,
        }
    }

    int_enum! {
        /// Open, its Display left to us.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Open: u16 {
            /// One.
            One = 1,
            /// Three.
            Three = 3,
        }
        unknown Other;
        display manual;
    }

    impl std::fmt::Display for Open {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} ({})", self.name(), self.code())
        }
    }

    #[test]
    fn closed_tables_round_trip_and_refuse_the_rest() {
        assert_eq!(Closed::ALL, [Closed::Zero, Closed::Two, Closed::Big]);
        for v in 0..=u8::MAX {
            match Closed::try_from(v) {
                Ok(c) => {
                    assert_eq!(c.code(), v);
                    assert_eq!(c as u8, v);
                    assert_eq!(u8::from(c), v);
                    assert!(Closed::ALL.contains(&c));
                }
                Err(e) => {
                    assert_eq!(
                        e,
                        UnknownValue {
                            of: "Closed",
                            value: v
                        }
                    );
                    assert_eq!(e.to_string(), format!("unknown Closed value {v}"));
                    assert_eq!(Closed::from_code(v), None);
                }
            }
        }
        assert_eq!(Closed::Two.to_string(), "TWO");
        assert_eq!(Closed::Big.name(), "Big");
    }

    #[test]
    fn open_tables_carry_unknown_values() {
        for v in 0..=u16::MAX {
            let o = Open::from(v);
            assert_eq!(u16::from(o), v);
            assert_eq!(o.is_known(), Open::ALL.contains(&o));
        }
        assert_eq!(Open::from(3), Open::Three);
        assert_eq!(Open::Other(9).name(), "Other");
        assert_eq!(Open::Three.to_string(), "Three (3)");
    }
}
