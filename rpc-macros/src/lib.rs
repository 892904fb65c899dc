//! The `#[service]` attribute of srpc: a trait of async methods becomes a
//! typed client and a server dispatcher. Its documentation, on the
//! attribute itself, is the full description (users read it as
//! `srpc::service`).
//!
//! Not here: what the generated code builds on (`rpc-core`'s `service`
//! module), serving and calling (`rpc-server`, `rpc-client`).

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote, ToTokens};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{FnArg, ItemTrait, Pat, ReturnType, TraitItem, Type};

/// Turns a trait of `async fn name(&self, args..) -> T` methods into an srpc
/// service: the trait (with `Send` futures), `NameClient<C>` and
/// `NameServer<T>`.
///
/// ```text
/// #[service]
/// pub trait Calculator {
///     async fn add(&self, a: i64, b: i64) -> i64;
/// }
/// // generates
/// pub trait Calculator: Send + Sync + 'static {
///     fn add(&self, a: i64, b: i64) -> impl Future<Output = i64> + Send;
/// }
/// pub struct CalculatorClient<C> { .. }   // add(&self, a, b) -> Result<i64, C::Error>
/// pub struct CalculatorServer<T> { .. }   // impl rpc_core::service::Service
/// ```
///
/// Implementations write `async fn add(&self, a: i64, b: i64) -> i64 { .. }`
/// as usual. A method marked `#[idempotent]` (safe to run twice: a read, a
/// put of a whole value) may be retried by the client after a failure that
/// leaves its outcome unknown; see `CallOptions::idempotent`. Per-call options (timeout, metadata, wait-for-ready) go
/// through the client: `calc.with_options(opts).add(2, 3)` (see
/// `CallOptions`). Methods travel as `Calculator.add` with the arguments as one
/// tuple. A method returning `Result<T, Status>` fails *as a call* with that
/// status (`InvalidArgument`, `PermissionDenied`, ...) and its client method
/// returns `Result<T, C::Error>`; any other `Result<T, E>` is sent whole, so
/// typed application errors travel as data.
///
/// Streams: a method may take one `Streaming<T>` argument (the caller
/// sends a stream of `T`) and return `ServerStream<T>` or
/// `Result<ServerStream<T>, Status>` (it sends one back), or both. The
/// client's method then takes `impl Stream<Item = T> + Send + 'static` for
/// the `Streaming<T>` argument and returns `Streaming<R>` for a
/// `ServerStream<R>` (otherwise the reply, once the stream is sent); it
/// needs a caller that opens streams (`StreamCaller`, which `Client` is).
/// Stream methods are not retried, so `#[idempotent]` is refused on them.
///
/// Generated code names the runtime crate as `::srpc::core` unless told
/// otherwise with `#[service(crate = some::path)]` (the framework's own
/// crates use `rpc_core`).
///
/// What is refused, with an error on the offending item: methods that are
/// not `async`, receivers other than `&self`, generic methods, patterns
/// instead of argument names, `impl Trait` arguments, borrowed arguments
/// (`&str`, `&[u8]`: arguments are decoded owned; take `String`, `Vec<u8>`
/// or `Bytes`), trait items other than methods, and the method names `new`,
/// `as_caller`, `with_options` and `options` (the generated client's own).
///
/// Which `Status` counts: `Result<T, Status>` fails as a call when the
/// error type is written `Status` (srpc's, imported) or reached through
/// srpc's crates (`srpc::Status`, `srpc::core::Status`, `rpc_core::Status`).
/// A type of your own that is merely named `Status` elsewhere
/// (`order::Status`) travels as data, like any other error type.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(attr as Args);
    let item = syn::parse_macro_input!(item as ItemTrait);
    match expand(args, item) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Args {
    krate: syn::Path,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.is_empty() {
            return Ok(Args {
                krate: syn::parse_quote!(::srpc::core),
            });
        }
        let key: syn::Token![crate] = input.parse()?;
        let _ = key;
        input.parse::<syn::Token![=]>()?;
        Ok(Args {
            krate: input.parse()?,
        })
    }
}

struct Method {
    name: syn::Ident,
    args: Vec<(syn::Ident, Type)>,
    /// The declared return type.
    ret: Type,
    /// `T` when the return type is `Result<T, Status>`: the method fails as
    /// a call with that status, and a success sends `T`.
    ok_of_status: Option<Type>,
    /// Marked `#[idempotent]`: safe to run more than once, so the client
    /// may retry it after a failure that leaves the outcome unknown.
    idempotent: bool,
    attrs: Vec<syn::Attribute>,
    /// The argument of type `Streaming<T>` (its index and `T`): the caller
    /// sends a stream of items.
    input: Option<(usize, Type)>,
    /// `T` when the method returns `ServerStream<T>` (or `Result` of it
    /// with `Status`): the reply is a stream of items.
    output: Option<Type>,
}

/// `Some(T)` for a type written `Name<T>` (any path ending so).
fn generic_of(ty: &Type, name: &str) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        syn::GenericArgument::Type(t) if args.args.len() == 1 => Some(t.clone()),
        _ => None,
    }
}

/// `Some(T)` for `Result<T, Status>` where `Status` is srpc's: written
/// `Status` (as imported from srpc), or a path through srpc's crates
/// (`srpc::Status`, `srpc::core::Status`, `rpc_core::Status`, ...). A type
/// of the user's that is merely named `Status` elsewhere (`order::Status`)
/// is data like any other error type. A macro cannot resolve names, so a
/// bare `Status` must be srpc's.
fn status_result(ty: &Type) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        syn::GenericArgument::Type(t) => Some(t),
        _ => None,
    });
    let (ok, err) = (types.next()?, types.next()?);
    let Type::Path(e) = err else { return None };
    is_srpc_status(&e.path).then(|| ok.clone())
}

/// True for `Status` and for `Status` reached through one of srpc's crates.
fn is_srpc_status(path: &syn::Path) -> bool {
    let names: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    let Some((last, prefix)) = names.split_last() else {
        return false;
    };
    if last != "Status" {
        return false;
    }
    match prefix {
        [] => path.leading_colon.is_none(),
        [first, rest @ ..] => {
            let srpc_crate = matches!(
                first.as_str(),
                "srpc" | "rpc_core" | "rpc_server" | "rpc_client"
            );
            let through = rest
                .iter()
                .all(|s| matches!(s.as_str(), "core" | "server" | "client" | "error"));
            srpc_crate && through
        }
    }
}

/// Names the generated client defines itself.
const RESERVED_NAMES: [&str; 4] = ["new", "as_caller", "with_options", "options"];

fn parse_method(item: &TraitItem) -> syn::Result<Method> {
    let TraitItem::Fn(f) = item else {
        return Err(syn::Error::new(
            item.span(),
            "srpc: a service trait may contain only `async fn` methods",
        ));
    };
    let sig = &f.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            "srpc: service methods must be `async fn` (e.g. `async fn add(&self, a: i64) -> i64;`)",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "srpc: service methods cannot be generic; the wire needs concrete types",
        ));
    }
    if let Some(body) = &f.default {
        return Err(syn::Error::new(
            body.span(),
            "srpc: service methods cannot have a default body",
        ));
    }
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => {}
        Some(other) => {
            return Err(syn::Error::new(
                other.span(),
                "srpc: the first parameter of a service method must be `&self`",
            ))
        }
        None => {
            return Err(syn::Error::new(
                sig.paren_token.span.join(),
                "srpc: service methods take `&self` first",
            ))
        }
    }
    let mut args = Vec::new();
    for arg in inputs {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new(
                arg.span(),
                "srpc: `self` may appear only first",
            ));
        };
        let Pat::Ident(id) = &*pt.pat else {
            return Err(syn::Error::new(
                pt.pat.span(),
                "srpc: service method arguments need plain names (no patterns)",
            ));
        };
        if let Type::ImplTrait(_) = &*pt.ty {
            return Err(syn::Error::new(
                pt.ty.span(),
                "srpc: `impl Trait` arguments cannot be sent; use a concrete serde type",
            ));
        }
        if let Type::Reference(r) = &*pt.ty {
            let owned = match &*r.elem {
                Type::Path(p) if p.path.is_ident("str") => "`String`",
                Type::Slice(_) => "`Vec<T>` (or `Bytes` for bytes)",
                _ => "the owned type",
            };
            return Err(syn::Error::new(
                pt.ty.span(),
                format!(
                    "srpc: arguments arrive over the network and are decoded owned; take {owned} instead of a reference"
                ),
            ));
        }
        args.push((id.ident.clone(), (*pt.ty).clone()));
    }
    let ret = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => {
            if let Type::ImplTrait(_) = &**ty {
                return Err(syn::Error::new(
                    ty.span(),
                    "srpc: `impl Trait` replies cannot be sent; use a concrete serde type",
                ));
            }
            (**ty).clone()
        }
    };
    if RESERVED_NAMES.contains(&sig.ident.to_string().as_str()) {
        return Err(syn::Error::new(
            sig.ident.span(),
            format!(
                "srpc: `{}` is taken by the generated client; name the method differently",
                sig.ident
            ),
        ));
    }
    let is_idempotent = |a: &syn::Attribute| a.path().is_ident("idempotent");
    let idempotent = f.attrs.iter().any(is_idempotent);
    if let Some(attr) = f.attrs.iter().find(|a| is_idempotent(a)) {
        if !matches!(attr.meta, syn::Meta::Path(_)) {
            return Err(syn::Error::new(
                attr.span(),
                "srpc: `#[idempotent]` takes no arguments",
            ));
        }
    }
    let attrs = f
        .attrs
        .iter()
        .filter(|a| !is_idempotent(a))
        .cloned()
        .collect();
    let mut input = None;
    for (i, (a, t)) in args.iter().enumerate() {
        if let Some(item) = generic_of(t, "Streaming") {
            if input.is_some() {
                return Err(syn::Error::new(
                    a.span(),
                    "srpc: a method takes at most one `Streaming<T>` argument",
                ));
            }
            input = Some((i, item));
        }
    }
    let ok_of_status = status_result(&ret);
    let output = generic_of(ok_of_status.as_ref().unwrap_or(&ret), "ServerStream");
    if idempotent && (input.is_some() || output.is_some()) {
        return Err(syn::Error::new(
            sig.ident.span(),
            "srpc: stream methods are not retried; remove `#[idempotent]`",
        ));
    }
    Ok(Method {
        name: sig.ident.clone(),
        args,
        ok_of_status,
        idempotent,
        ret,
        attrs,
        input,
        output,
    })
}

/// The client method of a stream method: it opens the call as a stream.
fn stream_client_method(krate: &syn::Path, service: &str, m: &Method) -> Tokens {
    let Method {
        name, args, attrs, ..
    } = m;
    let wire = format!("{service}.{name}");
    let input_index = m.input.as_ref().map(|(i, _)| *i);
    let params = args.iter().enumerate().map(|(i, (a, t))| match &m.input {
        Some((at, item)) if *at == i => {
            quote!(#a: impl #krate::streaming::Stream<Item = #item> + ::core::marker::Send + 'static)
        }
        _ => quote!(#a: #t),
    });
    let values = args
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != input_index)
        .map(|(_, (a, _))| a);
    let sends = m.input.is_some();
    let has_doc = attrs.iter().any(|a| a.path().is_ident("doc"));
    let fallback = format!("Calls `{wire}` as a stream.");
    let doc = (!has_doc).then(|| quote!(#[doc = #fallback]));
    let open = quote! {
        let (sender, receiver) = #krate::service::StreamCaller::open_stream(
            &self.caller, #wire, &( #(#values,)* ), &self.options, #sends).await?;
        let max_depth = #krate::service::StreamCaller::max_depth(&self.caller);
    };
    let (ret, body) = match (&m.output, &m.input) {
        (Some(item), None) => (
            quote!(#krate::streaming::Streaming<#item>),
            quote! {
                let _ = sender;
                ::core::result::Result::Ok(#krate::streaming::Streaming::new(receiver, max_depth))
            },
        ),
        (Some(item), Some((i, _))) => {
            let input = &args[*i].0;
            (
                quote!(#krate::streaming::Streaming<#item>),
                quote! {
                    let pump = #krate::streaming::spawn_items(#wire, sender, #input);
                    ::core::result::Result::Ok(
                        #krate::streaming::Streaming::new(receiver, max_depth).with_pump(pump))
                },
            )
        }
        (None, Some((i, _))) => {
            let input = &args[*i].0;
            let reply = m.ok_of_status.as_ref().unwrap_or(&m.ret);
            (
                quote!(#reply),
                quote! {
                    #krate::streaming::send_then_reply::<_, _, #reply>(
                        #wire, sender, receiver, #input, max_depth)
                        .await
                        .map_err(|e| #krate::service::StreamCaller::stream_error(&self.caller, #wire, e))
                },
            )
        }
        (None, None) => unreachable!("not a stream method"),
    };
    quote! {
        #doc
        #(#attrs)*
        pub async fn #name(&self, #(#params),*) -> ::core::result::Result<#ret, C::Error>
        where
            C: #krate::service::StreamCaller,
        {
            #open
            #body
        }
    }
}

/// The server's arm of a stream method: the call's stream handles go to
/// the handler's `Streaming` argument and from its `ServerStream`.
fn stream_arm(krate: &syn::Path, service: &str, m: &Method) -> Tokens {
    let Method { name, args, .. } = m;
    let wire = format!("{service}.{name}");
    let input_index = m.input.as_ref().map(|(i, _)| *i);
    let plain: Vec<_> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != input_index)
        .map(|(_, a)| a)
        .collect();
    let names: Vec<_> = plain.iter().map(|(a, _)| a).collect();
    let types: Vec<_> = plain.iter().map(|(_, t)| t).collect();
    let all: Vec<_> = args.iter().map(|(a, _)| a).collect();
    let take_input = m.input.as_ref().map(|(i, item)| {
        let a = &args[*i].0;
        quote!(let #a = #krate::streaming::incoming::<#item>(#wire, &ctx, io.receiver.take())?;)
    });
    let reply = if m.ok_of_status.is_some() {
        quote!(reply?)
    } else {
        quote!(reply)
    };
    let finish = match &m.output {
        Some(_) => quote!(#krate::streaming::send_all(#wire, io.sender, #reply).await),
        None => quote! {
            drop(io);
            #krate::service::encode_reply(#wire, &#reply)
        },
    };
    quote! {
        #wire => {
            let inner = self.inner.clone();
            ::core::option::Option::Some(::std::boxed::Box::pin(async move {
                #[allow(unused_mut)]
                let mut io = #krate::streaming::served_stream(#wire, &ctx)?;
                let ( #(#names,)* ): ( #(#types,)* ) =
                    #krate::service::decode_args(#wire, &ctx, &body)?;
                #take_input
                let reply = #krate::service::with_context(ctx, inner.#name(#(#all),*)).await;
                #finish
            }))
        }
    }
}

fn type_name(ty: &Type) -> String {
    ty.to_token_stream().to_string().replace(' ', "")
}

fn expand(args: Args, item: ItemTrait) -> syn::Result<Tokens> {
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "srpc: service traits cannot be generic",
        ));
    }
    let methods = item
        .items
        .iter()
        .map(parse_method)
        .collect::<syn::Result<Vec<_>>>()?;
    let krate = &args.krate;
    let vis = &item.vis;
    let name = &item.ident;
    let attrs = &item.attrs;
    let service = name.to_string();
    let client = format_ident!("{}Client", name);
    let server = format_ident!("{}Server", name);

    let trait_methods = methods.iter().map(|m| {
        let Method { name, args, ret, attrs, .. } = m;
        let params = args.iter().map(|(a, t)| quote!(#a: #t));
        quote! {
            #(#attrs)*
            fn #name(&self, #(#params),*) -> impl ::core::future::Future<Output = #ret> + ::core::marker::Send;
        }
    });

    let client_methods = methods.iter().map(|m| {
        if m.input.is_some() || m.output.is_some() {
            return stream_client_method(krate, &service, m);
        }
        let Method {
            name, args, attrs, ..
        } = m;
        let ret = m.ok_of_status.as_ref().unwrap_or(&m.ret);
        let wire = format!("{service}.{name}");
        let params = args.iter().map(|(a, t)| quote!(#a: #t));
        let values = args.iter().map(|(a, _)| a);
        let has_doc = attrs.iter().any(|a| a.path().is_ident("doc"));
        let fallback = format!("Calls `{wire}`.");
        let doc = (!has_doc).then(|| quote!(#[doc = #fallback]));
        let call = if m.idempotent {
            quote! {
                let options = self.options.clone().idempotent_unless_set();
                self.caller.call_method(#wire, &( #(#values,)* ), &options).await
            }
        } else {
            quote!(self.caller.call_method(#wire, &( #(#values,)* ), &self.options).await)
        };
        quote! {
            #doc
            #(#attrs)*
            pub async fn #name(&self, #(#params),*) -> ::core::result::Result<#ret, C::Error> {
                #call
            }
        }
    });

    let arms = methods.iter().map(|m| {
        if m.input.is_some() || m.output.is_some() {
            return stream_arm(krate, &service, m);
        }
        let Method { name, args, .. } = m;
        let wire = format!("{service}.{name}");
        let names: Vec<_> = args.iter().map(|(a, _)| a).collect();
        let types: Vec<_> = args.iter().map(|(_, t)| t).collect();
        let reply = if m.ok_of_status.is_some() {
            quote!(#krate::service::encode_reply(#wire, &reply?))
        } else {
            quote!(#krate::service::encode_reply(#wire, &reply))
        };
        quote! {
            #wire => {
                let inner = self.inner.clone();
                ::core::option::Option::Some(::std::boxed::Box::pin(async move {
                    let ( #(#names,)* ): ( #(#types,)* ) =
                        #krate::service::decode_args(#wire, &ctx, &body)?;
                    let reply = #krate::service::with_context(ctx, inner.#name(#(#names),*)).await;
                    #reply
                }))
            }
        }
    });

    let descriptions = methods.iter().map(|m| {
        let method = m.name.to_string();
        let args = m.args.iter().map(|(a, t)| {
            let a = a.to_string();
            let t = type_name(t);
            quote!((#a.to_string(), #t.to_string()))
        });
        let ret = type_name(m.ok_of_status.as_ref().unwrap_or(&m.ret));
        quote! {
            #krate::service::MethodDescription {
                name: #method.to_string(),
                args: ::std::vec![#(#args),*],
                returns: #ret.to_string(),
            }
        }
    });

    let schemas = methods.iter().map(|m| {
        let method = m.name.to_string();
        let input_index = m.input.as_ref().map(|(i, _)| *i);
        let args = m
            .args
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != input_index)
            .map(|(_, (a, t))| {
                let a = a.to_string();
                quote!((#a, (&#krate::schema::Probe::<#t>::new()).traced()))
            });
        let reply = match &m.output {
            Some(_) => quote!(()),
            None => m.ok_of_status.as_ref().unwrap_or(&m.ret).to_token_stream(),
        };
        let probe = |t: Option<&Type>| match t {
            Some(t) => {
                quote!(::core::option::Option::Some((&#krate::schema::Probe::<#t>::new()).traced()))
            }
            None => quote!(::core::option::Option::None),
        };
        let items_in = probe(m.input.as_ref().map(|(_, t)| t));
        let items_out = probe(m.output.as_ref());
        quote! {
            (
                #method.to_string(),
                #krate::schema::trace_method(
                    &[#(#args),*],
                    (&#krate::schema::Probe::<#reply>::new()).traced(),
                    #items_in,
                    #items_out,
                ),
            )
        }
    });

    let client_doc = format!(
        "Typed client of the `{service}` service; wrap any `Caller` (an `rpc_client::Client`)."
    );
    let server_doc = format!(
        "Serves an implementation of `{service}`: give it to `ServerBuilder::add_service`."
    );
    Ok(quote! {
        #(#attrs)*
        #vis trait #name: ::core::marker::Send + ::core::marker::Sync + 'static {
            #(#trait_methods)*
        }

        #[doc = #client_doc]
        #[derive(Clone, Debug)]
        #vis struct #client<C> {
            caller: C,
            options: #krate::CallOptions,
        }

        impl<C: #krate::service::Caller> #client<C> {
            /// Calls go through `caller` (a connected client), with its
            /// default options.
            pub fn new(caller: C) -> Self {
                Self { caller, options: #krate::CallOptions::new() }
            }

            /// A client whose calls use `options` (timeout, metadata,
            /// wait-for-ready); unset fields keep the caller's defaults:
            /// `calc.with_options(opts).add(2, 3).await`.
            pub fn with_options(&self, options: #krate::CallOptions) -> Self
            where
                C: ::core::clone::Clone,
            {
                Self { caller: self.caller.clone(), options }
            }

            /// The options this client's calls use.
            pub fn options(&self) -> &#krate::CallOptions {
                &self.options
            }

            /// The underlying caller (the connected client).
            pub fn as_caller(&self) -> &C {
                &self.caller
            }

            #(#client_methods)*
        }

        #[doc = #server_doc]
        #vis struct #server<T> {
            inner: ::std::sync::Arc<T>,
        }

        impl<T: #name> #server<T> {
            /// Wraps an implementation.
            pub fn new(inner: T) -> Self {
                Self { inner: ::std::sync::Arc::new(inner) }
            }
        }

        impl<T: #name> #krate::service::Service for #server<T> {
            fn describe(&self) -> #krate::service::ServiceDescription {
                #krate::service::ServiceDescription {
                    name: #service.to_string(),
                    methods: ::std::vec![#(#descriptions),*],
                }
            }

            // The borrow picks `Untraceable` when `Traceable` does not apply.
            #[allow(clippy::needless_borrow)]
            fn schemas(&self) -> ::std::vec::Vec<(::std::string::String, #krate::schema::SchemaResult)> {
                #[allow(unused_imports)]
                use #krate::schema::{Traceable as _, Untraceable as _};
                ::std::vec![#(#schemas),*]
            }

            fn call(
                &self,
                ctx: #krate::CallContext,
                body: #krate::__private::Bytes,
            ) -> ::core::option::Option<#krate::BoxFuture<::core::result::Result<#krate::__private::Bytes, #krate::Status>>> {
                match ctx.method() {
                    #(#arms)*
                    _ => ::core::option::Option::None,
                }
            }
        }
    })
}
