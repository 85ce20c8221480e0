//! Database operations on AWS (`rigger db` for an AWS environment): the API side.
