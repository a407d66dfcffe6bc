//! The lab's certificate authorities (etcd TLS, the Kubernetes control
//! plane): EC P-256 keys and certificates made with `openssl` in a
//! directory, valid for a week (a lab lives minutes).

use anyhow::Context;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const NEW_EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];
const DAYS: &str = "7";

/// `openssl ARGS` in `dir`.
pub(crate) fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("openssl");
    c.current_dir(dir).args(args);
    crate::exec::check(c, None, Duration::from_secs(20))
        .map(drop)
        .context("openssl")
}

/// A self-signed CA in `dir`: key `ca.key`, certificate `cert`.
pub(crate) fn ca(dir: &Path, cert: &str, cn: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let subj = format!("/CN={cn}");
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(&NEW_EC_KEY);
    args.extend_from_slice(&[
        "-keyout", "ca.key", "-out", cert, "-days", DAYS, "-subj", &subj,
    ]);
    openssl(dir, &args)
}

/// A key `NAME.key` and certificate `NAME_CERT` signed by the CA of
/// [`ca`] (`ca_cert`), with the extensions `extensions` (openssl's
/// `-extfile` syntax).
pub(crate) fn issue(
    dir: &Path,
    name: &str,
    cn: &str,
    ca_cert: &str,
    extensions: &str,
    cert: &str,
) -> anyhow::Result<()> {
    let (key, csr, ext, subj) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
        format!("/CN={cn}"),
    );
    std::fs::write(dir.join(&ext), extensions)?;
    let mut req = vec!["req"];
    req.extend_from_slice(&NEW_EC_KEY);
    req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
    openssl(dir, &req)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca_cert,
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            DAYS,
            "-extfile",
            &ext,
        ],
    )
}
