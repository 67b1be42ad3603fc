# The registry bucket and the role Ray nodes use to reach it.
#   terraform init && terraform apply -var bucket_name=my-crucible-registry
# Then: export CRUCIBLE_REGISTRY=s3://my-crucible-registry/prod
terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.60"
    }
  }
}

provider "aws" {
  region = var.region
}

resource "aws_s3_bucket" "registry" {
  bucket = var.bucket_name
  tags   = var.tags
}

# Blobs are content-addressed and manifests create-only, so versioning is belt and braces: it
# keeps an overwritten or deleted alias recoverable.
resource "aws_s3_bucket_versioning" "registry" {
  bucket = aws_s3_bucket.registry.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "registry" {
  bucket = aws_s3_bucket.registry.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "registry" {
  bucket                  = aws_s3_bucket.registry.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "registry" {
  bucket = aws_s3_bucket.registry.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "registry" {
  bucket = aws_s3_bucket.registry.id

  # Request logs from Serve grow without bound: move them to infrequent access, then expire them.
  rule {
    id     = "request-logs"
    status = "Enabled"
    filter {
      prefix = "${var.registry_prefix}/logs/"
    }
    transition {
      days          = 30
      storage_class = "STANDARD_IA"
    }
    expiration {
      days = var.log_retention_days
    }
  }

  # Old versions of overwritten objects (aliases) are kept for a while, then dropped.
  rule {
    id     = "noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = 90
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_node" {
  name               = "crucible-ray-node"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = var.tags
}

data "aws_iam_policy_document" "registry_access" {
  statement {
    sid       = "ListRegistry"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.registry.arn]
  }
  statement {
    sid       = "ReadWriteRegistry"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.registry.arn}/${var.registry_prefix}/*"]
  }
}

resource "aws_iam_role_policy" "registry_access" {
  name   = "crucible-registry"
  role   = aws_iam_role.ray_node.id
  policy = data.aws_iam_policy_document.registry_access.json
}

resource "aws_iam_instance_profile" "ray_node" {
  name = "crucible-ray-node"
  role = aws_iam_role.ray_node.name
}
