# glmGamPoi in a fresh R process. Args: data_dir out_dir genes_file(1-based indices)
# Fit timed with system.time() around glm_gp() only; data are read before.
args <- commandArgs(trailingOnly = TRUE)
hwm_mb <- function() {  # this process's peak resident memory so far (VmHWM), MiB
  line <- grep("^VmHWM:", readLines("/proc/self/status"), value = TRUE)
  as.numeric(strsplit(trimws(sub("VmHWM:", "", line)), " +")[[1]][1]) / 1024
}
data_dir <- args[1]; out_dir <- args[2]; genes <- scan(args[3], quiet = TRUE)
suppressPackageStartupMessages(library(glmGamPoi))
sf <- scan(file.path(data_dir, "sf.txt"), quiet = TRUE)
X <- as.matrix(read.csv(file.path(data_dir, "design.csv"), check.names = FALSE))
n_cells <- length(sf)
con <- file(file.path(data_dir, "counts.f64"), "rb")
n_genes <- file.info(file.path(data_dir, "counts.f64"))$size / 8 / n_cells
Y <- matrix(readBin(con, "double", n = n_cells * n_genes, size = 8, endian = "little"),
            nrow = n_genes, ncol = n_cells)
close(con)
Y <- Y[genes, , drop = FALSE]
invisible(gc())
mem_before_fit <- hwm_mb()
t <- system.time(fit <- glm_gp(Y, design = X, size_factors = sf, overdispersion = TRUE,
                               overdispersion_shrinkage = FALSE,
                               do_cox_reid_adjustment = FALSE, on_disk = FALSE))
beta <- fit$Beta  # genes x p, columns = colnames(X)
od <- fit$overdispersions
writeBin(as.vector(t(beta)), file.path(out_dir, "beta.f64"), size = 8, endian = "little")
writeBin(as.vector(od), file.path(out_dir, "overdispersion.f64"), size = 8, endian = "little")
writeLines(c(sprintf("%.6f", t[["elapsed"]]), sprintf("%.6f", t[["user.self"]]),
             as.character(packageVersion("glmGamPoi")), R.version.string,
             paste(colnames(beta), collapse = "\t"), sprintf("%.3f", mem_before_fit), sprintf("%.3f", hwm_mb())),
           file.path(out_dir, "timing.txt"))
