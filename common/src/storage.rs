//! Object storage (S3 and S3-compatible servers) for hosts that share no disk: prepared data is
//! uploaded with `troupe prepare --out s3://bucket/prefix`, and every host that trains on
//! `data.dir = "s3://bucket/prefix"` fetches it into a cache of its own; checkpoints go to
//! `checkpoint.store` (see `checkpoint::store`).
//!
//! Endpoint, region and credentials come from the usual environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP` for a plain-HTTP test server); secrets are never
//! printed, and errors name the URL (which holds none) and the operation. Requests that time
//! out or get a 5xx answer are retried with exponential backoff and jitter, a bounded number of
//! times (`object_store`'s retry loop).
//!
//! The calls here are blocking: each runs on a thread of its own with a small runtime, so they
//! can be made from the trainer's thread and from inside an async caller alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::client::{HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, RetryConfig, WriteMultipart};
use sha2::{Digest, Sha256};

/// Whether a data or output location names object storage rather than a local folder.
pub fn is_remote(location: &Path) -> bool {
    location.to_str().is_some_and(|s| s.starts_with("s3://"))
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{url}: {what}: {message}")]
    Remote { url: String, what: String, message: String },
    #[error("{what} {}: {source}", path.display())]
    Local { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{url}: {what} has sha256 {got}, its meta.json records {want} (fetched twice; the stored object is corrupt)")]
    Corrupt { url: String, what: String, got: String, want: String },
}

/// A bucket and a prefix in it, with the runtime its HTTP client's connections live on.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Dropping a runtime from inside another one panics; this does not (the coordinator
        // fetches data from an async context).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Remote {
    /// `s3://bucket/prefix`, with what the environment says about endpoint and credentials.
    pub fn open(url: &str) -> Result<Remote, StorageError> {
        let failed = |message: String| StorageError::Remote { url: url.to_string(), what: "open".into(), message };
        let rest = url.strip_prefix("s3://").ok_or_else(|| failed("only s3:// URLs name object storage".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(failed("no bucket: write s3://bucket/prefix".into()));
        }
        let retry = RetryConfig {
            max_retries: 5,
            retry_timeout: Duration::from_secs(60),
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
        };
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry).with_http_connector(CountingConnector);
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        }
        // The error text of a bad configuration can hold the values it was given: only say
        // which setting is wrong.
        let store = builder
            .build()
            .map_err(|e| failed(format!("the S3 settings in the environment are not usable ({})", redact(&e.to_string()))))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("cannot start a runtime for its client: {e}")))?;
        Ok(Remote {
            url: url.trim_end_matches('/').to_string(),
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            runtime: Some(runtime),
        })
    }

    /// Runs a future on this store's runtime, from a thread of its own (so that a caller
    /// inside another runtime can wait for it too). One runtime for the store's life: its
    /// pooled connections belong to it.
    fn blocking<T: Send>(&self, future: impl std::future::Future<Output = T> + Send) -> T {
        let runtime = self.runtime.as_ref().expect("a runtime until dropped");
        std::thread::scope(|scope| scope.spawn(|| runtime.block_on(future)).join().expect("the storage thread does not panic"))
    }

    /// Whether the object `name` exists.
    pub fn exists(&self, name: &str) -> Result<bool, StorageError> {
        let key = self.key(name);
        self.blocking(async {
            match self.store.head(&key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.err(format!("HEAD {name}"), e)),
            }
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix.as_ref()))
        }
    }

    fn err(&self, what: impl Into<String>, e: impl std::fmt::Display) -> StorageError {
        StorageError::Remote { url: self.url.clone(), what: what.into(), message: redact(&e.to_string()) }
    }

    /// The whole object `name` under the prefix.
    pub fn get(&self, name: &str) -> Result<Vec<u8>, StorageError> {
        let key = self.key(name);
        self.blocking(async {
            let got = self.store.get(&key).await.map_err(|e| self.err(format!("GET {name}"), e))?;
            let bytes = got.bytes().await.map_err(|e| self.err(format!("GET {name}"), e))?;
            Ok(bytes.to_vec())
        })
    }

    /// Streams the object `name` into a new file at `path` (written aside and renamed into
    /// place), returning its sha256; `Ok(None)` when there is no such object.
    pub fn get_to_file(&self, name: &str, path: &Path) -> Result<Option<String>, StorageError> {
        use futures::StreamExt;
        use std::io::Write;
        let key = self.key(name);
        let tmp = path.with_extension(format!("partial-{}", std::process::id()));
        let local = |what, source| StorageError::Local { what, path: tmp.clone(), source };
        let result = self.blocking(async {
            let got = match self.store.get(&key).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.err(format!("GET {name}"), e)),
            };
            let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| local("create", e))?);
            let mut hash = Sha256::new();
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.err(format!("GET {name}"), e))?;
                hash.update(&chunk);
                file.write_all(&chunk).map_err(|e| local("write", e))?;
            }
            file.flush().map_err(|e| local("write", e))?;
            file.get_ref().sync_all().map_err(|e| local("flush to disk", e))?;
            Ok(Some(hex::encode(hash.finalize())))
        });
        match result {
            Ok(Some(digest)) => {
                std::fs::rename(&tmp, path).map_err(|source| StorageError::Local {
                    what: "rename into place",
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(Some(digest))
            }
            other => {
                let _ = std::fs::remove_file(&tmp);
                other
            }
        }
    }

    /// Uploads a local file as `name`: one PUT when small, a multipart upload (8 MiB parts,
    /// 4 in flight) when large. A failed multipart upload is aborted, so nothing half-written
    /// is left under `name`.
    pub fn put_file(&self, name: &str, path: &Path) -> Result<(), StorageError> {
        use std::io::Read;
        const PART: usize = 8 << 20;
        let key = self.key(name);
        let local = |source| StorageError::Local { what: "read", path: path.to_path_buf(), source };
        let size = std::fs::metadata(path).map_err(local)?.len();
        self.blocking(async {
            if size <= PART as u64 {
                let bytes = std::fs::read(path).map_err(local)?;
                self.store.put(&key, bytes.into()).await.map_err(|e| self.err(format!("PUT {name}"), e))?;
                return Ok(());
            }
            let upload = self.store.put_multipart(&key).await.map_err(|e| self.err(format!("starting the upload of {name}"), e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut file = std::fs::File::open(path).map_err(local)?;
            let mut buf = vec![0u8; PART];
            let copied: Result<(), StorageError> = async {
                loop {
                    let n = file.read(&mut buf).map_err(local)?;
                    if n == 0 {
                        return Ok(());
                    }
                    writer.wait_for_capacity(4).await.map_err(|e| self.err(format!("uploading {name}"), e))?;
                    writer.write(&buf[..n]);
                }
            }
            .await;
            match copied {
                Ok(()) => writer.finish().await.map(|_| ()).map_err(|e| self.err(format!("finishing the upload of {name}"), e)),
                Err(e) => {
                    let _ = writer.abort().await;
                    Err(e)
                }
            }
        })
    }
}

impl Remote {
    /// Writes `bytes` as `name`, replacing what is there.
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        let key = self.key(name);
        self.blocking(async { self.store.put(&key, bytes.into()).await.map(|_| ()).map_err(|e| self.err(format!("PUT {name}"), e)) })
    }

    /// Writes `bytes` as `name` only if there is no object of that name yet (a conditional
    /// PUT, `If-None-Match: *`): `Ok(false)` when one exists. The store decides, so of two
    /// writers racing for the same name exactly one wins.
    pub fn put_if_absent(&self, name: &str, bytes: Vec<u8>) -> Result<bool, StorageError> {
        let key = self.key(name);
        self.blocking(async {
            let options = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
            match self.store.put_opts(&key, bytes.into(), options).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(self.err(format!("PUT {name} (if absent)"), e)),
            }
        })
    }

    /// Bytes `range` of the object `name` (a ranged GET).
    pub fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>, StorageError> {
        let key = self.key(name);
        self.blocking(async {
            let bytes = self.store.get_range(&key, range.clone()).await.map_err(|e| self.err(format!("GET {name} bytes {range:?}"), e))?;
            Ok(bytes.to_vec())
        })
    }

    /// The size of the object `name`, or `None` when there is none.
    pub fn size(&self, name: &str) -> Result<Option<u64>, StorageError> {
        let key = self.key(name);
        self.blocking(async {
            match self.store.head(&key).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(format!("HEAD {name}"), e)),
            }
        })
    }

    /// The names of the "folders" directly under `dir` (common prefixes), sorted.
    pub fn list_dirs(&self, dir: &str) -> Result<Vec<String>, StorageError> {
        let key = self.key(dir);
        self.blocking(async {
            let listed = self.store.list_with_delimiter(Some(&key)).await.map_err(|e| self.err(format!("LIST {dir}/"), e))?;
            let mut names: Vec<String> = listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
            names.sort();
            Ok(names)
        })
    }

    /// Deletes the object `name` (nothing to do when there is none).
    pub fn delete(&self, name: &str) -> Result<(), StorageError> {
        let key = self.key(name);
        self.blocking(async {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err(format!("DELETE {name}"), e)),
            }
        })
    }

    /// Deletes every object under `dir`.
    pub fn delete_dir(&self, dir: &str) -> Result<(), StorageError> {
        use futures::TryStreamExt;
        let key = self.key(dir);
        self.blocking(async {
            let objects: Vec<object_store::ObjectMeta> =
                self.store.list(Some(&key)).try_collect().await.map_err(|e| self.err(format!("LIST {dir}/"), e))?;
            for object in objects {
                self.store.delete(&object.location).await.map_err(|e| self.err(format!("DELETE {}", object.location), e))?;
            }
            Ok(())
        })
    }
}

/// Requests to object storage that failed (a timeout or connection error, or a 5xx or 429
/// answer); the client retries each with backoff while its budget lasts (5 tries, 60 s). One
/// counter per process, registered in its metrics.
pub fn request_failures() -> &'static prometheus::IntCounterVec {
    static FAILURES: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
        prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "troupe_storage_request_failures_total",
                "Object-storage requests that failed (reason: transport = timeout or connection, server = 5xx or 429) and were retried with backoff while the budget lasted",
            ),
            &["reason"],
        )
        .expect("a constant metric definition")
    });
    &FAILURES
}

/// Object storage requests failed so far in this process.
pub fn request_failures_total() -> u64 {
    ["transport", "server"].iter().map(|r| request_failures().with_label_values(&[r]).get()).sum()
}

/// The HTTP client object_store would use, wrapped to count failed requests.
#[derive(Debug, Default)]
struct CountingConnector;

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Counting(ReqwestConnector::default().connect(options)?)))
    }
}

#[derive(Debug)]
struct Counting(HttpClient);

#[async_trait::async_trait]
impl HttpService for Counting {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let result = self.0.execute(request).await;
        let failed = match &result {
            Err(_) => Some("transport"),
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => Some("server"),
            Ok(_) => None,
        };
        if let Some(reason) = failed {
            request_failures().with_label_values(&[reason]).inc();
        }
        result
    }
}

/// Takes credentials out of a message from the storage client: anything after a key-like
/// word, up to the next space.
fn redact(message: &str) -> String {
    let mut out = message.to_string();
    for secret in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"] {
        if let Ok(value) = std::env::var(secret) {
            if value.len() >= 4 {
                out = out.replace(&value, "<redacted>");
            }
        }
    }
    out
}

/// Where fetched data is cached on this host: `$TROUPE_CACHE`, else `~/.cache/troupe`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TROUPE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("troupe")
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| StorageError::Local { what: "write", path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| StorageError::Local { what: "rename into place", path: path.to_path_buf(), source })
}
