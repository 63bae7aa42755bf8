//! Connections to the agent's sockets, for the CLI and tests.

use std::path::Path;

use crate::proto::admin as pb;

/// A gRPC channel over a Unix socket, for the CLI and tests.
pub async fn unix_channel(
    path: &Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://mayfly.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let io = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        }))
        .await
}

/// Connects to the admin socket.
pub async fn connect(
    path: &Path,
) -> Result<pb::tasks_client::TasksClient<tonic::transport::Channel>, tonic::transport::Error> {
    Ok(pb::tasks_client::TasksClient::new(
        unix_channel(path).await?,
    ))
}
