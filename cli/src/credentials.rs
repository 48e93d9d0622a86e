//! The user's own bearer token for the upload endpoint, from the kubeconfig: the
//! endpoint authenticates it with a TokenReview, so only a token works (a client
//! certificate ends at the API server and cannot be forwarded).

use crate::error::{CliError, Result};
use kube::config::{AuthInfo, ExecConfig};
use secrecy::ExposeSecret;

fn no_token(user: &str, why: &str) -> CliError {
    CliError::Usage(format!(
        "the hvx upload endpoint authenticates you with your Kubernetes bearer token, and \
         {why} (kubeconfig user {user:?}). Pass --upload-token (or HVX_UPLOAD_TOKEN) with a \
         token the API server accepts and that may create overlaydisks/upload in the target \
         namespace (namespace edit or admin), e.g. `kubectl create token <serviceaccount> -n \
         <namespace>` for a ServiceAccount bound to edit there; or use a kubeconfig whose user \
         has a token, tokenFile or exec credential plugin"
    ))
}

/// The bearer token `auth` authenticates with: `token`, `tokenFile`, or the output of
/// its `exec` plugin. `user` names it in errors.
pub fn bearer_token(user: &str, auth: &AuthInfo) -> Result<String> {
    if let Some(t) = &auth.token {
        return Ok(t.expose_secret().trim().to_string());
    }
    if let Some(f) = &auth.token_file {
        return std::fs::read_to_string(f)
            .map(|t| t.trim().to_string())
            .map_err(|e| CliError::Usage(format!("reading the kubeconfig's tokenFile {f}: {e}")));
    }
    if let Some(exec) = &auth.exec {
        return exec_token(user, exec);
    }
    let why = if auth.client_certificate.is_some() || auth.client_certificate_data.is_some() {
        "your kubeconfig authenticates with a client certificate"
    } else if auth.auth_provider.is_some() {
        "your kubeconfig uses an auth-provider plugin, which this client does not run"
    } else {
        "your kubeconfig holds no credentials"
    };
    Err(no_token(user, why))
}

/// The token an exec credential plugin prints (`ExecCredential.status.token`, pure).
pub fn parse_exec_credential(stdout: &[u8]) -> std::result::Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_slice(stdout).map_err(|e| format!("its output is not JSON: {e}"))?;
    v.pointer("/status/token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            "its ExecCredential has no status.token (a client certificate instead?)".into()
        })
}

fn exec_token(user: &str, exec: &ExecConfig) -> Result<String> {
    let Some(command) = &exec.command else {
        return Err(no_token(user, "its exec plugin names no command"));
    };
    let api_version = exec
        .api_version
        .clone()
        .unwrap_or_else(|| "client.authentication.k8s.io/v1".into());
    let mut cmd = std::process::Command::new(command);
    cmd.args(exec.args.iter().flatten());
    for pair in exec.env.iter().flatten() {
        if let (Some(k), Some(v)) = (pair.get("name"), pair.get("value")) {
            cmd.env(k, v);
        }
    }
    cmd.env(
        "KUBERNETES_EXEC_INFO",
        serde_json::json!({"apiVersion": api_version, "kind": "ExecCredential",
                           "spec": {"interactive": false}})
        .to_string(),
    );
    cmd.stdin(std::process::Stdio::null());
    let out = cmd.output().map_err(|e| {
        CliError::Usage(format!(
            "running the kubeconfig's exec plugin {command}: {e}"
        ))
    })?;
    if !out.status.success() {
        return Err(CliError::Usage(format!(
            "the kubeconfig's exec plugin {command} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_exec_credential(&out.stdout).map_err(|why| {
        no_token(
            user,
            &format!("its exec plugin {command} gave no token: {why}"),
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn auth(yaml: &str) -> AuthInfo {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn token_and_token_file() {
        assert_eq!(bearer_token("u", &auth("token: abc\n")).unwrap(), "abc");
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "from-file\n").unwrap();
        let a = auth(&format!("tokenFile: {}\n", f.path().display()));
        assert_eq!(bearer_token("u", &a).unwrap(), "from-file");
    }

    #[test]
    fn client_certificates_get_an_explanation() {
        let err = bearer_token(
            "admin",
            &auth("client-certificate-data: eA==\nclient-key-data: eA==\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("client certificate"), "{err}");
        assert!(err.contains("--upload-token"), "{err}");
        assert!(err.contains("kubectl create token"), "{err}");
    }

    #[test]
    fn exec_plugins_run_with_their_env() {
        let a = auth(
            "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: sh\n  args: [\"-c\", \
             \"printf '{\\\"status\\\":{\\\"token\\\":\\\"%s\\\"}}' \\\"$T\\\"\"]\n  env: [{name: T, value: tok-1}]\n",
        );
        assert_eq!(bearer_token("u", &a).unwrap(), "tok-1");
        assert!(parse_exec_credential(br#"{"status":{"clientCertificateData":"x"}}"#).is_err());
        assert!(parse_exec_credential(b"nope").is_err());
    }
}
