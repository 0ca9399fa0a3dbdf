pub mod batch;
pub mod health;
pub mod jobs;
pub mod status;
