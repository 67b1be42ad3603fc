variable "region" {
  type        = string
  default     = "us-west-2"
  description = "AWS region of the bucket and the cluster."
}

variable "bucket_name" {
  type        = string
  description = "Globally unique name of the registry bucket."
}

variable "registry_prefix" {
  type        = string
  default     = "prod"
  description = "Prefix inside the bucket: CRUCIBLE_REGISTRY=s3://<bucket>/<prefix>."
}

variable "kms_key_arn" {
  type        = string
  default     = null
  description = "KMS key for server-side encryption; null uses the AWS-managed aws/s3 key."
}

variable "log_retention_days" {
  type        = number
  default     = 365
  description = "Days before Serve request logs expire."
}

variable "tags" {
  type        = map(string)
  default     = { project = "crucible" }
  description = "Tags on every resource."
}
