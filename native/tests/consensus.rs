//! Four validators on loopback, each on its own thread with its own storage: they finalize
//! blocks, carry a transaction submitted to one of them, and deliver the same chain to all; in
//! epochs of 5 blocks, told each next committee at the epoch's last block, as the ledger does:
//! from epoch 2 on, validator 4 is left out, and the other three go on without it, under
//! certificates of the new committee (a validator not in an epoch's committee runs no engine).

use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};
use swarmserve_native::consensus::block::BlockLimits;
use swarmserve_native::consensus::node::{Node, NodeConfig};
use swarmserve_native::consensus::proofs::verify_finalization;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn public_key(seed: [u8; 32]) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes()
}

const EPOCH: u64 = 5;

#[test]
fn validators_finalize_one_chain_across_epochs_and_committees() {
    let dir = std::env::temp_dir().join(format!("swarmserve-consensus-{}", std::process::id()));
    let seeds: Vec<[u8; 32]> = (1..=4u8).map(|i| [i; 32]).collect();
    let addresses: Vec<SocketAddr> = seeds
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let validators: Vec<([u8; 32], SocketAddr)> = seeds
        .iter()
        .map(|s| public_key(*s))
        .zip(addresses.iter().copied())
        .collect();
    let nodes: Vec<Node> = seeds
        .iter()
        .enumerate()
        .map(|(i, seed)| {
            Node::start(NodeConfig {
                seed: *seed,
                storage_directory: dir.join(format!("v{i}")),
                listen: addresses[i],
                epoch: 0,
                committees: BTreeMap::from([(0, validators.clone())]),
                epoch_length: EPOCH,
                floor: None,
                max_committee: 4,
                genesis: b"test genesis".to_vec(),
                equivocate: false,
                limits: BlockLimits::default(),
                block_interval: Duration::from_millis(100),
                leader_timeout: Duration::from_secs(1),
                mempool_transactions: 1000,
                mempool_bytes: 1 << 20,
            })
            .unwrap()
        })
        .collect();
    nodes[2].submit(Bytes::from_static(b"pay bob 5")).unwrap();
    let committee = |epoch: u64| -> Vec<([u8; 32], SocketAddr)> {
        if epoch < 2 {
            validators.clone()
        } else {
            validators[..3].to_vec()
        }
    };
    let keys = |epoch: u64| -> Vec<[u8; 32]> { committee(epoch).iter().map(|(k, _)| *k).collect() };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut chains: Vec<Vec<[u8; 32]>> = vec![Vec::new(); 4];
    let mut carried = [false; 4];
    let mut certified_late = 0;
    while chains[..3].iter().any(|c| c.len() < 4 * EPOCH as usize) || !carried.iter().all(|c| *c) {
        assert!(
            Instant::now() < deadline,
            "progress: {:?}, carried {carried:?}",
            chains.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (i, node) in nodes.iter().enumerate() {
            while let Some(block) = node.next_finalized(Duration::from_millis(10)).unwrap() {
                assert_eq!(
                    block.height as usize,
                    chains[i].len(),
                    "heights in order from genesis, without gaps"
                );
                let epoch = block.height / EPOCH;
                if let Some(certificate) = &block.certificate {
                    let proven = verify_finalization(&keys(epoch), certificate).unwrap();
                    assert_eq!((proven.digest, proven.epoch), (block.digest, epoch));
                    certified_late += usize::from(epoch >= 2);
                }
                carried[i] |= block.block.transactions.iter().any(|t| t.as_ref() == b"pay bob 5");
                chains[i].push(block.digest);
                node.acknowledge(block.height);
                if block.height % EPOCH == EPOCH - 1 {
                    node.add_committee(epoch + 1, &committee(epoch + 1)).unwrap();
                    node.enter_epoch(epoch + 1, block.digest).unwrap();
                }
            }
        }
    }
    assert!(
        certified_late > 0,
        "blocks of epochs 2 and 3 carry the new committee's certificates"
    );
    let shortest = chains.iter().map(Vec::len).min().unwrap();
    for chain in &chains[1..] {
        assert_eq!(chain[..shortest], chains[0][..shortest]);
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(dir);
}
