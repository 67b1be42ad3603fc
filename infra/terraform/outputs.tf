output "registry_uri" {
  value       = "s3://${aws_s3_bucket.registry.bucket}/${var.registry_prefix}"
  description = "Set CRUCIBLE_REGISTRY to this."
}

output "instance_profile" {
  value       = aws_iam_instance_profile.ray_node.name
  description = "IamInstanceProfile for cluster/aws.yaml node configs."
}

output "role_arn" {
  value       = aws_iam_role.ray_node.arn
  description = "For IRSA on Kubernetes, trust this role from the crucible-ray service account."
}
